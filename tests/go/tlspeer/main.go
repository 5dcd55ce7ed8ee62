// tlspeer is a small mutual-TLS peer built on Go's crypto/tls, used by tests/interop_go.rs to
// check trustwire against a TLS stack it did not write. Standard library only.
//
//	tlspeer client -addr HOST:PORT -ca CA.pem [-cert C.pem -key C.key] -servername NAME -send FILE
//	    Connects, verifies the server against CA and NAME, sends FILE's bytes, reads one
//	    baidu_std frame ("PRPC", body_size u32 BE, meta_size u32 BE, body) and writes it to
//	    stdout. Progress and the peer's URI SANs go to stderr.
//	tlspeer server -ca CA.pem -cert S.pem -key S.key [-p256]
//	    Listens on 127.0.0.1:0 requiring a client certificate signed by CA, prints
//	    "port N" as the first stdout line, then for every connection prints
//	    "peer URI version GROUP" (or "refused ERROR") and echoes whatever the client sends.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: tlspeer client|server [flags]")
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	addr := fs.String("addr", "", "server address (client)")
	caFile := fs.String("ca", "", "CA bundle (PEM)")
	certFile := fs.String("cert", "", "certificate chain (PEM)")
	keyFile := fs.String("key", "", "private key (PEM)")
	serverName := fs.String("servername", "localhost", "name to verify (client)")
	send := fs.String("send", "", "file whose bytes are sent (client)")
	timeout := fs.Duration("timeout", 15*time.Second, "overall deadline")
	p256 := fs.Bool("p256", false, "offer only the P-256 group, like a stock brpc server (server)")
	_ = fs.Parse(os.Args[2:])

	pool := x509.NewCertPool()
	ca, err := os.ReadFile(*caFile)
	if err != nil || !pool.AppendCertsFromPEM(ca) {
		fail("cannot load CA %q: %v", *caFile, err)
	}
	var certs []tls.Certificate
	if *certFile != "" {
		c, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			fail("cannot load key pair: %v", err)
		}
		certs = append(certs, c)
	}

	switch os.Args[1] {
	case "client":
		runClient(*addr, pool, certs, *serverName, *send, *timeout)
	case "server":
		runServer(pool, certs, *p256, *timeout)
	default:
		fail("unknown mode %q", os.Args[1])
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "tlspeer: "+format+"\n", args...)
	os.Exit(2)
}

func runClient(addr string, pool *x509.CertPool, certs []tls.Certificate, name, send string, timeout time.Duration) {
	payload, err := os.ReadFile(send)
	if err != nil {
		fail("cannot read %q: %v", send, err)
	}
	cfg := &tls.Config{RootCAs: pool, Certificates: certs, ServerName: name, MinVersion: tls.VersionTLS12}
	dialer := &net.Dialer{Timeout: timeout}
	conn, err := tls.DialWithDialer(dialer, "tcp", addr, cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "handshake failed: %v\n", err)
		os.Exit(3)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	st := conn.ConnectionState()
	fmt.Fprintf(os.Stderr, "connected %s %s\n", tls.VersionName(st.Version), tls.CipherSuiteName(st.CipherSuite))
	for _, u := range st.PeerCertificates[0].URIs {
		fmt.Fprintf(os.Stderr, "server_uri %s\n", u)
	}
	if _, err := conn.Write(payload); err != nil {
		fmt.Fprintf(os.Stderr, "write failed: %v\n", err)
		os.Exit(3)
	}
	header := make([]byte, 12)
	if _, err := io.ReadFull(conn, header); err != nil {
		fmt.Fprintf(os.Stderr, "read failed: %v\n", err)
		os.Exit(3)
	}
	if string(header[:4]) != "PRPC" {
		fmt.Fprintf(os.Stderr, "not a baidu_std frame: % x\n", header)
		os.Exit(3)
	}
	body := make([]byte, binary.BigEndian.Uint32(header[4:8]))
	if binary.BigEndian.Uint32(header[8:12]) > uint32(len(body)) {
		fmt.Fprintf(os.Stderr, "meta_size larger than body_size: % x\n", header)
		os.Exit(3)
	}
	if _, err := io.ReadFull(conn, body); err != nil {
		fmt.Fprintf(os.Stderr, "read failed: %v\n", err)
		os.Exit(3)
	}
	os.Stdout.Write(header)
	os.Stdout.Write(body)
}

func runServer(pool *x509.CertPool, certs []tls.Certificate, p256 bool, timeout time.Duration) {
	cfg := &tls.Config{
		Certificates: certs,
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	}
	if p256 {
		cfg.CurvePreferences = []tls.CurveID{tls.CurveP256}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail("listen: %v", err)
	}
	fmt.Printf("port %d\n", ln.Addr().(*net.TCPAddr).Port)
	// Nothing outlives the deadline, even when the test that started us is gone.
	go func() {
		time.Sleep(4 * timeout)
		os.Exit(4)
	}()
	for {
		raw, err := ln.Accept()
		if err != nil {
			fail("accept: %v", err)
		}
		go serve(tls.Server(raw, cfg), timeout)
	}
}

func serve(conn *tls.Conn, timeout time.Duration) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if err := conn.Handshake(); err != nil {
		fmt.Printf("refused %v\n", err)
		return
	}
	st := conn.ConnectionState()
	uri := "-"
	if len(st.PeerCertificates) > 0 && len(st.PeerCertificates[0].URIs) > 0 {
		uri = st.PeerCertificates[0].URIs[0].String()
	}
	fmt.Printf("peer %s %s %s\n", uri, tls.VersionName(st.Version), groupName(st))
	if _, err := io.Copy(conn, conn); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		fmt.Fprintf(os.Stderr, "echo: %v\n", err)
	}
}
