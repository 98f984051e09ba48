package sigv4auth

import (
	"net/http"
	"time"
)

// amzDateLayout is the ISO 8601 basic format of X-Amz-Date and of the
// request time in the string to sign.
const amzDateLayout = "20060102T150405Z"

// parseAmzDate parses an X-Amz-Date value, yyyymmdd'T'hhmmss'Z' in UTC. It
// accepts only calendar-valid times so that one instant has one spelling.
func parseAmzDate(s string) (time.Time, bool) {
	if len(s) != len(amzDateLayout) || s[8] != 'T' || s[15] != 'Z' ||
		!isDigits(s[:8]) || !isDigits(s[9:15]) {
		return time.Time{}, false
	}
	year := atoi(s[0:4])
	month := atoi(s[4:6])
	day := atoi(s[6:8])
	hour := atoi(s[9:11])
	minute := atoi(s[11:13])
	sec := atoi(s[13:15])
	if month < 1 || month > 12 || day < 1 || hour > 23 || minute > 59 || sec > 59 {
		return time.Time{}, false
	}
	t := time.Date(year, time.Month(month), day, hour, minute, sec, 0, time.UTC)
	if t.Day() != day { // e.g. 20260230 rolled over into March
		return time.Time{}, false
	}
	return t, true
}

// parseDateHeader parses a Date header used in place of X-Amz-Date: either
// the ISO 8601 basic format or an HTTP date (RFC 9110).
func parseDateHeader(s string) (time.Time, bool) {
	if t, ok := parseAmzDate(s); ok {
		return t, true
	}
	t, err := http.ParseTime(s)
	if err != nil {
		return time.Time{}, false
	}
	return t.UTC(), true
}

// atoi converts a short run of ASCII digits already checked by isDigits.
func atoi(s string) int {
	n := 0
	for i := 0; i < len(s); i++ {
		n = n*10 + int(s[i]-'0')
	}
	return n
}
