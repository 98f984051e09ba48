package frontend

// AllowList is a key store's allow-list of external key ids: nil when keys
// is the single entry "*", which allows every key.
func AllowList(keys []string) map[string]bool {
	if len(keys) == 1 && keys[0] == "*" {
		return nil
	}
	return Set(keys)
}

// Set is the set of names.
func Set(names []string) map[string]bool {
	s := make(map[string]bool, len(names))
	for _, n := range names {
		s[n] = true
	}
	return s
}
