package ekmhandler

import (
	"strings"
)

// operation is one of the four EKM API calls, by its path segment.
type operation uint8

const (
	opInfo operation = iota + 1
	opMetadata
	opWrap
	opUnwrap
)

// String is the operation's path segment, as logs and policies name it.
func (op operation) String() string {
	switch op {
	case opInfo:
		return "info"
	case opMetadata:
		return "metadata"
	case opWrap:
		return "wrapkey"
	case opUnwrap:
		return "unwrapkey"
	}
	return "unknown"
}

// keyOperations are the operations on a key, by path segment.
var keyOperations = map[string]operation{"metadata": opMetadata, "wrapkey": opWrap, "unwrapkey": opUnwrap}

// route splits a raw request path (sigv4auth.RawPath) into its key store,
// operation and key name: {prefix}/info or {prefix}/{key name}/{operation},
// with the prefix matched exactly (no trailing slash, no other spelling).
// Nothing is cleaned or decoded. The key name is not checked here, so that
// a malformed one is told apart from a path of no key store.
func (h *Handler) route(path string) (ks *KeyStore, op operation, keyName string, ok bool) {
	rest, last, found := cutLast(path)
	if !found {
		return nil, 0, "", false
	}
	if last == "info" {
		ks = h.stores[rest]
		return ks, opInfo, "", ks != nil
	}
	op, known := keyOperations[last]
	if !known {
		return nil, 0, "", false
	}
	prefix, keyName, found := cutLast(rest)
	if !found {
		return nil, 0, "", false
	}
	ks = h.stores[prefix]
	return ks, op, keyName, ks != nil
}

// cutLast splits path at its last slash.
func cutLast(path string) (before, after string, found bool) {
	i := strings.LastIndexByte(path, '/')
	if i < 0 {
		return "", "", false
	}
	return path[:i], path[i+1:], true
}
