// Package jsonref reads JSON for tests the slow, obvious way, with
// encoding/json alone: it is the reference that the fuzz tests hold the
// front ends' strict request decoders (frontend.DecodeObject) to.
package jsonref

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
)

// ErrNameTwice is the error of an object that gives a name twice where
// names must be unique.
var ErrNameTwice = errors.New("a name given twice")

// ErrNotOneValue is the error of a text that is not exactly one JSON value
// (white space aside).
var ErrNotOneValue = errors.New("not exactly one JSON value")

// Read reads body, which must be exactly one JSON value, into maps, slices
// and scalars (numbers as json.Number). unique says, for an object at depth
// (0 for the top-level value) that is the value of the member named parent
// ("" in an array or at the top), whether its names must be unique.
func Read(body []byte, unique func(depth int, parent string) bool) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var v any
	if dec.Decode(&v) != nil {
		return nil, ErrNotOneValue
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, ErrNotOneValue
	}
	dec = json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	return walk(dec, 0, "", unique)
}

func walk(dec *json.Decoder, depth int, parent string, unique func(int, string) bool) (any, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch tok {
	case json.Delim('{'):
		once := unique(depth, parent)
		obj := map[string]any{}
		for dec.More() {
			k, err := dec.Token()
			if err != nil {
				return nil, err
			}
			name := k.(string)
			if _, twice := obj[name]; twice && once {
				return nil, ErrNameTwice
			}
			if obj[name], err = walk(dec, depth+1, name, unique); err != nil {
				return nil, err
			}
		}
		_, err := dec.Token()
		return obj, err
	case json.Delim('['):
		var arr []any
		for dec.More() {
			v, err := walk(dec, depth+1, "", unique)
			if err != nil {
				return nil, err
			}
			arr = append(arr, v)
		}
		_, err := dec.Token()
		return arr, err
	}
	return tok, nil
}
