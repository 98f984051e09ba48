package frontend

import (
	"errors"
	"fmt"
	"io"
	"net/http"
)

// ErrBodyUnreadable is the error of a request body that could not be read.
var ErrBodyUnreadable = errors.New("the request body could not be read")

// BodyTooLargeError is the error of a request body longer than the limit.
type BodyTooLargeError struct{ Limit int64 }

func (e *BodyTooLargeError) Error() string {
	return fmt.Sprintf("request bodies larger than %d bytes are not supported", e.Limit)
}

// ReadBody reads at most limit bytes of the request body.
//
// A body of declared length is read as exactly that many bytes, into a
// buffer of that size: one Read call as a rule, and none past the end.
// Each Read of a request body costs more than the copy on HTTP/2: Caddy's
// idle read timeout (on by default, a minute) sets the stream's read
// deadline before the call and puts it back after it, and each of those is
// a message to the connection's serving goroutine and a timer there. Read
// to EOF through io.ReadAll, a 700-byte Encrypt took three calls and six
// such messages; the serving goroutine, one per connection, handles every
// stream's frames too, and the handlers waiting for it were the largest
// scheduling delay in the trace of a paced load (scripts/profile.sh).
// HTTP/1.1 and HTTP/2 both hold a body to its declared length (a shorter
// one is a read error, a longer one a protocol error), so the bytes read
// are the whole body.
func ReadBody(r *http.Request, limit int64) ([]byte, error) {
	if r.ContentLength > limit {
		return nil, &BodyTooLargeError{Limit: limit}
	}
	if r.ContentLength >= 0 {
		body := make([]byte, r.ContentLength)
		if _, err := io.ReadFull(r.Body, body); err != nil {
			return nil, ErrBodyUnreadable
		}
		return body, nil
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	if err != nil {
		return nil, ErrBodyUnreadable
	}
	if int64(len(body)) > limit {
		return nil, &BodyTooLargeError{Limit: limit}
	}
	return body, nil
}
