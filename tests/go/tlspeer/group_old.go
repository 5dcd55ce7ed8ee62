//go:build !go1.25

package main

import "crypto/tls"

// groupName: toolchains before Go 1.25 do not report the negotiated group.
func groupName(tls.ConnectionState) string {
	return "unknown"
}
