//go:build go1.25

package main

import "crypto/tls"

// groupName reports the negotiated key exchange group (ConnectionState.CurveID is Go 1.25+).
func groupName(st tls.ConnectionState) string {
	return st.CurveID.String()
}
