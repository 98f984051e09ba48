package ekmhandler

import (
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"

	"github.com/caddy-xks/caddy-xks/ekmapi"
	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/hsm"
)

// contextBody is the body of info and metadata, and wrapBody that of
// wrapkey and unwrapkey. Fields that do not belong to an operation are
// ignored like any other unknown field, for forward compatibility. Pointers
// tell a missing field from an empty one.
type contextBody struct {
	RequestContext *requestContext `json:"request_context"`
}

type wrapBody struct {
	RequestContext *requestContext `json:"request_context"`
	Alg            *string         `json:"alg"`
	Value          *string         `json:"value"`
}

type requestContext struct {
	RequestID     *string `json:"request_id"`
	CorrelationID *string `json:"correlation_id"`
	PoolName      *string `json:"pool_name"`
}

// ekmRequest is a decoded and validated request.
type ekmRequest struct {
	context ekmapi.RequestContext
	alg     string            // wrapkey, unwrapkey
	wrapAlg hsm.WrapAlgorithm // alg as the hsm package names it
	value   []byte            // wrapkey, unwrapkey
}

// algorithms maps the API's alg names to the hsm package's.
var algorithms = map[string]hsm.WrapAlgorithm{
	ekmapi.AlgA256KW:     hsm.AESKeyWrap,
	ekmapi.AlgA256KWP:    hsm.AESKeyWrapPad,
	ekmapi.AlgRSAOAEP:    hsm.RSAOAEP,
	ekmapi.AlgRSAOAEP256: hsm.RSAOAEP256,
}

// checkAPIVersion requires exactly one api-version query parameter, of a
// version the proxy serves.
func checkAPIVersion(rawQuery string) *ekmError {
	supported := "supported: " + strings.Join(ekmapi.SupportedAPIVersions, ", ")
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		return newError(ekmapi.CodeUnsupportedAPIVersion, "the query string cannot be read; api-version is required, "+supported)
	}
	v, ok := q["api-version"]
	switch {
	case !ok:
		return newError(ekmapi.CodeUnsupportedAPIVersion, "the api-version query parameter is required; "+supported)
	case len(v) != 1:
		return newError(ekmapi.CodeUnsupportedAPIVersion, "api-version is given more than once; "+supported)
	case !ekmapi.SupportsAPIVersion(v[0]):
		// The client's text is not echoed.
		return newError(ekmapi.CodeUnsupportedAPIVersion, "the api-version is not supported; "+supported)
	}
	return nil
}

// decodeRequest parses and validates the body of op.
func decodeRequest(op operation, body []byte) (*ekmRequest, *ekmError) {
	var b wrapBody
	var err error
	if op == opInfo || op == opMetadata {
		var c contextBody
		err = frontend.DecodeObject(body, &c)
		b.RequestContext = c.RequestContext
	} else {
		err = frontend.DecodeObject(body, &b)
	}
	if err != nil {
		if de, ok := errors.AsType[*frontend.DecodeError](err); ok {
			return nil, invalid(de.Message)
		}
		return nil, invalid(frontend.ErrNotJSON)
	}
	if b.RequestContext == nil {
		return nil, invalid("request_context is required")
	}
	req := &ekmRequest{}
	c := b.RequestContext
	for _, f := range []struct {
		name     string
		value    *string
		required bool
		into     *string
	}{
		{"request_id", c.RequestID, false, &req.context.RequestID},
		{"correlation_id", c.CorrelationID, true, &req.context.CorrelationID},
		{"pool_name", c.PoolName, true, &req.context.PoolName},
	} {
		switch {
		case f.value == nil || *f.value == "":
			if f.required {
				return nil, invalid("request_context." + f.name + " is required")
			}
		case len(*f.value) > ekmapi.MaxContextFieldLen:
			return nil, invalid(fmt.Sprintf("request_context.%s is longer than %d bytes", f.name, ekmapi.MaxContextFieldLen))
		default:
			*f.into = *f.value
		}
	}
	if op == opInfo || op == opMetadata {
		return req, nil
	}
	if b.Alg == nil {
		return nil, invalid("alg is required")
	}
	alg, known := algorithms[*b.Alg]
	if !known {
		return nil, newError(ekmapi.CodeUnsupportedAlgorithm, "alg must be one of "+strings.Join(slices.Clone(ekmapi.Algorithms), ", "))
	}
	req.alg, req.wrapAlg = *b.Alg, alg
	if b.Value == nil {
		return nil, invalid("value is required")
	}
	v, err := ekmapi.DecodeValue(*b.Value)
	if err != nil {
		return nil, invalid("value is not base64url without padding")
	}
	if len(v) == 0 {
		return nil, invalid("value is empty")
	}
	req.value = v
	return req, nil
}
