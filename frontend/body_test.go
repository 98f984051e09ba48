package frontend

import (
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
)

// countingBody is a request body that hands out at most chunk bytes per
// Read and counts the calls, as Caddy's idle read timeout does: on HTTP/2
// each call costs two messages to the connection's serving goroutine.
type countingBody struct {
	data  string
	chunk int
	calls int
	// pastEnd counts the calls made once every byte had been read.
	pastEnd int
	// firstLen is the buffer the first call was given.
	firstLen int
}

func (b *countingBody) Read(p []byte) (int, error) {
	b.calls++
	if b.calls == 1 {
		b.firstLen = len(p)
	}
	if b.data == "" {
		b.pastEnd++
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), b.chunk)], b.data)
	b.data = b.data[n:]
	return n, nil
}

// The errors of ReadBody, by kind.
const (
	unreadable = "unreadable"
	tooLarge   = "too large"
)

func errorKind(err error) string {
	if _, ok := errors.AsType[*BodyTooLargeError](err); ok {
		return tooLarge
	}
	if errors.Is(err, ErrBodyUnreadable) {
		return unreadable
	}
	return ""
}

func TestReadBody(t *testing.T) {
	const limit = 10000
	body := strings.Repeat("x", 700)
	long := strings.Repeat("x", 5000)
	tests := []struct {
		name string
		// declared is the Content-Length, -1 for none (chunked).
		declared int64
		sent     string
		chunk    int
		// calls is how many Read calls the body may take, 0 for any.
		calls   int
		wantErr string
	}{
		{"declared length: one call, none past the end", 700, body, 4096, 1, ""},
		{"declared length in two pieces: two calls, none past the end", 700, body, 400, 2, ""},
		{"declared length at the limit, one byte sent: a small buffer", limit, "x", 4096, 0, unreadable},
		{"declared length past the first buffer: it doubles as the bytes come", 5000, long, 1 << 16, 3, ""},
		{"empty declared body: no call", 0, "", 4096, 0, ""},
		{"declared length longer than what came", 800, body, 4096, 0, unreadable},
		{"declared length over the limit: refused before any call", limit + 1, "", 4096, 0, tooLarge},
		{"no declared length, within the limit", -1, body, 300, 0, ""},
		{"no declared length, past the first buffer", -1, long, 1 << 16, 0, ""},
		{"no declared length, over the limit", -1, strings.Repeat("x", limit+1), 4096, 0, tooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rb := &countingBody{data: tt.sent, chunk: tt.chunk}
			r := &http.Request{Method: http.MethodPost, ContentLength: tt.declared, Body: io.NopCloser(rb)}
			got, err := ReadBody(r, limit)
			// The buffer grows with what arrives, never with what is
			// declared: a client that declares a large body and sends
			// nothing makes the proxy hold firstBodyRead bytes at most.
			if rb.firstLen > firstBodyRead {
				t.Errorf("the first Read was given %d bytes before any had arrived, want at most %d", rb.firstLen, firstBodyRead)
			}
			if tt.wantErr != "" {
				if errorKind(err) != tt.wantErr {
					t.Fatalf("ReadBody = %q, %v; want %s", got, err, tt.wantErr)
				}
				if tt.declared > limit && rb.calls != 0 {
					t.Errorf("%d Read calls before refusing a body declared over the limit", rb.calls)
				}
				return
			}
			if err != nil {
				t.Fatalf("ReadBody: %v", err)
			}
			if string(got) != tt.sent {
				t.Errorf("ReadBody returned %d bytes, want the %d sent", len(got), len(tt.sent))
			}
			if tt.declared >= 0 {
				if tt.calls != rb.calls {
					t.Errorf("%d Read calls, want %d", rb.calls, tt.calls)
				}
				if rb.pastEnd != 0 {
					t.Errorf("%d Read calls past the end of a body of declared length", rb.pastEnd)
				}
			}
		})
	}
}
