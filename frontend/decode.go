package frontend

import (
	"bytes"
	"encoding/json"
	"reflect"
	"slices"
	"strings"
	"sync"
	"unicode/utf8"
)

// DecodeError is the error of a request body that DecodeObject refuses.
// Its message may be shown to the client: it names the API's fields, never
// the client's own text.
type DecodeError struct{ Message string }

func (e *DecodeError) Error() string { return e.Message }

func decodeError(message string) *DecodeError { return &DecodeError{Message: message} }

// ErrNotJSON is the message for a body encoding/json cannot read.
const ErrNotJSON = "request body is not valid JSON"

// DecodeObject reads body as exactly one JSON object into the struct v
// points to, whose fields are strings, pointers to strings, or pointers to
// structs of the same kind (objects within the object). It is stricter than
// encoding/json in three ways: a name fills a field only if it is spelled
// as the field's json tag, case included ("PLAINTEXT" is an unknown field,
// not plaintext); a name given twice in an object is refused, where
// encoding/json would keep the last; and only white space may follow the
// object. Unknown names are skipped, as both APIs require, whatever their
// value. JSON null leaves a field unset, as encoding/json does.
//
// encoding/json checks the body first (json.Valid, which allocates
// nothing); the walk below then only has to find the members of a valid
// JSON text, and strings with escapes or bytes past ASCII are unquoted by
// encoding/json itself, so every value reads as encoding/json reads it.
func DecodeObject(body []byte, v any) error {
	if !json.Valid(body) {
		var first json.RawMessage
		if json.NewDecoder(bytes.NewReader(body)).Decode(&first) == nil {
			return decodeError("request body has data after the JSON object")
		}
		return decodeError(ErrNotJSON)
	}
	w := walker{buf: body}
	w.space()
	if w.peek() != '{' {
		return decodeError("request body is not a JSON object")
	}
	w.i++
	rv := reflect.ValueOf(v).Elem()
	if err := w.object("", fieldsOf(rv.Type()), rv); err != nil {
		return err
	}
	return nil
}

// fieldTable maps the json tag names of a struct's fields to their index.
type fieldTable map[string]int

// fieldTables caches the table of each struct type decoded.
var fieldTables sync.Map // reflect.Type -> fieldTable

func fieldsOf(t reflect.Type) fieldTable {
	if ft, ok := fieldTables.Load(t); ok {
		return ft.(fieldTable)
	}
	ft := make(fieldTable, t.NumField())
	for i := range t.NumField() {
		if name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ","); name != "" && name != "-" {
			ft[name] = i
		}
	}
	fieldTables.Store(t, ft)
	return ft
}

// walker reads the members of a JSON text that json.Valid accepted.
type walker struct {
	buf []byte
	i   int
}

func (w *walker) peek() byte {
	if w.i < len(w.buf) {
		return w.buf[w.i]
	}
	return 0
}

func (w *walker) space() {
	for w.i < len(w.buf) {
		switch w.buf[w.i] {
		case ' ', '\t', '\n', '\r':
			w.i++
		default:
			return
		}
	}
}

// str reads the string at w.i and returns its value.
func (w *walker) str() string {
	start := w.i
	w.i++ // the opening quote
	plain := true
	for {
		switch c := w.buf[w.i]; c {
		case '"':
			w.i++
			if plain {
				return string(w.buf[start+1 : w.i-1])
			}
			var s string
			_ = json.Unmarshal(w.buf[start:w.i], &s) // valid: json.Valid said so
			return s
		case '\\':
			plain = false
			w.i += 2
		default:
			plain = plain && c < utf8.RuneSelf
			w.i++
		}
	}
}

// skip passes over the value at w.i.
func (w *walker) skip() {
	switch w.buf[w.i] {
	case '"':
		w.str()
	case '{', '[':
		depth := 0
		for {
			switch w.buf[w.i] {
			case '"':
				w.str()
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
			}
			w.i++
			if depth == 0 {
				return
			}
		}
	default: // a number, true, false or null
		for w.i < len(w.buf) {
			switch w.buf[w.i] {
			case ',', '}', ']', ' ', '\t', '\n', '\r':
				return
			}
			w.i++
		}
	}
}

// names remembers the member names of one object, to refuse one given
// twice: a short list, and a map once there are many.
type names struct {
	list []string
	set  map[string]bool
}

func (n *names) add(name string) (dup bool) {
	if n.set != nil {
		dup = n.set[name]
		n.set[name] = true
		return dup
	}
	if slices.Contains(n.list, name) {
		return true
	}
	n.list = append(n.list, name)
	if len(n.list) > 16 {
		n.set = make(map[string]bool, 2*len(n.list))
		for _, s := range n.list {
			n.set[s] = true
		}
	}
	return false
}

// object reads the members of the object whose '{' w has just passed, up
// to its '}', into the struct v, whose fields ft names. path is the
// object's name in messages, "" for the body itself.
func (w *walker) object(path string, ft fieldTable, v reflect.Value) *DecodeError {
	var seen names
	seen.list = make([]string, 0, 16)
	w.space()
	if w.peek() == '}' {
		w.i++
		return nil
	}
	for {
		w.space()
		name := w.str()
		idx, known := ft[name]
		if seen.add(name) {
			// An unknown name is not echoed: it is the client's text.
			if known {
				return decodeError(fieldPath(path, name) + " is given twice")
			}
			if path == "" {
				return decodeError("request body has a field name twice")
			}
			return decodeError(path + " has a field name twice")
		}
		w.space()
		w.i++ // the colon
		w.space()
		if known {
			if err := w.field(path, name, v.Field(idx)); err != nil {
				return err
			}
		} else {
			w.skip()
		}
		w.space()
		c := w.buf[w.i]
		w.i++ // a comma or the closing '}'
		if c == '}' {
			return nil
		}
	}
}

// field reads the value of the known field name of the object at path: a
// string, a pointer to a string, or a pointer to a struct read as an
// object. JSON null leaves the field unset, as encoding/json does.
func (w *walker) field(path, name string, f reflect.Value) *DecodeError {
	switch c := w.peek(); {
	case c == 'n':
		w.i += len("null")
		return nil
	case f.Kind() == reflect.Pointer && f.Type().Elem().Kind() == reflect.Struct:
		if c != '{' {
			return decodeError(fieldPath(path, name) + " must be an object")
		}
		w.i++
		f.Set(reflect.New(f.Type().Elem()))
		return w.object(fieldPath(path, name), fieldsOf(f.Type().Elem()), f.Elem())
	case c != '"':
		return decodeError(fieldPath(path, name) + " must be a string")
	}
	s := w.str()
	if f.Kind() == reflect.Pointer {
		f.Set(reflect.ValueOf(&s))
	} else {
		f.SetString(s)
	}
	return nil
}

// fieldPath names the member name of the object at path in messages.
func fieldPath(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}
