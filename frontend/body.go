package frontend

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
)

// ErrBodyUnreadable is the error of a request body that could not be read.
var ErrBodyUnreadable = errors.New("the request body could not be read")

// BodyTooLargeError is the error of a request body longer than the limit.
type BodyTooLargeError struct{ Limit int64 }

func (e *BodyTooLargeError) Error() string {
	return fmt.Sprintf("request bodies larger than %d bytes are not supported", e.Limit)
}

// firstBodyRead is the buffer a body's first Read gets: every request of
// either API whose fields are not unusually long fits, so it is read in one
// call.
const firstBodyRead = 2 << 10

// ReadBody reads at most limit bytes of the request body.
//
// Memory grows with the bytes that arrive, never with the length a client
// declares: the body is read into a buffer of firstBodyRead bytes (less
// for a shorter body), which doubles each time it fills, up to the declared
// length or limit. The body comes before the request is authenticated, so
// anyone who knows a key store's path could otherwise make the proxy hold
// max_request_body bytes per HTTP/2 stream with a HEADERS frame of a few
// bytes: 240 streams of one connection that declared 64 KiB and sent
// nothing held 17 MiB (xkshandler's TestUnsignedHTTP2BodiesHoldNoMemory).
//
// A body of declared length that fits the first buffer takes one Read call
// as a rule, and no call is made past its end. Each Read of a request body
// costs more than the copy on HTTP/2: Caddy's idle read timeout (on by
// default, a minute) sets the stream's read deadline before the call and
// puts it back after it, and each of those is a message to the
// connection's serving goroutine and a timer there. Read to EOF through
// io.ReadAll, a 700-byte Encrypt took three calls and six such messages;
// the serving goroutine, one per connection, handles every stream's frames
// too, and the handlers waiting for it were the largest scheduling delay in
// the trace of a paced load (scripts/profile.sh). HTTP/1.1 and HTTP/2 both
// hold a body to its declared length (a shorter one is a read error, a
// longer one a protocol error), so the bytes read are the whole body.
func ReadBody(r *http.Request, limit int64) ([]byte, error) {
	if r.ContentLength > limit {
		return nil, &BodyTooLargeError{Limit: limit}
	}
	// Without a declared length, one byte past the limit says the body is
	// too large.
	want := r.ContentLength
	if want < 0 {
		want = limit + 1
	}
	body := make([]byte, 0, min(want, firstBodyRead))
	for int64(len(body)) < want {
		if len(body) == cap(body) {
			body = append(make([]byte, 0, min(want, 2*int64(cap(body)))), body...)
		}
		n, err := r.Body.Read(body[len(body):cap(body)])
		body = body[:len(body)+n]
		if errors.Is(err, io.EOF) && r.ContentLength < 0 {
			break
		}
		if err != nil && int64(len(body)) < want {
			return nil, ErrBodyUnreadable
		}
	}
	if int64(len(body)) > limit {
		return nil, &BodyTooLargeError{Limit: limit}
	}
	return body, nil
}

// WriteJSON writes an answer of compact JSON with its status and length.
func WriteJSON(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}
