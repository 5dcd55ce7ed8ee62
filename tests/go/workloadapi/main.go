// A SPIFFE Workload API agent for trustwire's tests, built on go-spiffe's generated
// proto/spiffe/workload package and grpc-go, so the client is checked against the same server
// code SPIRE uses.
//
//	workloadapi serve -dir DIR -unix PATH [-tcp 127.0.0.1:0]
//	workloadapi probe -unix PATH [-header=false]
//
// serve answers FetchX509SVID with the material in DIR and reads commands from stdin, one a
// line, answering each on stdout:
//
//	push          reread DIR and send the new response on every open stream (and to new ones)
//	close         end every open stream with Unavailable (the agent stays up)
//	refuse CODE   answer new streams with a gRPC status (unavailable, permission_denied,
//	              invalid_argument); "refuse ok" serves again
//
// DIR holds, for each SVID in name order, svids/NAME/{id,chain,key,bundle[,hint]}, plus
// federated/TRUST_DOMAIN and crls/NAME. Every item is read from ITEM.der as raw bytes when that
// file exists (so a test can send malformed material) and otherwise from ITEM.pem, whose PEM
// blocks are decoded and concatenated (ASN.1 DER, as the Workload API carries them). Each CRL
// PEM block becomes one CRL entry. A federated bundle is keyed by "spiffe://TRUST_DOMAIN".
//
// Like a real agent it refuses requests without the `workload.spiffe.io: true` metadata with
// InvalidArgument (SPIFFE Workload Endpoint, section 6).
//
// probe makes one FetchX509SVID call, with or without that metadata, and prints "ok ID" or
// "error CODE: MESSAGE".
package main

import (
	"bufio"
	"context"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

var out = struct {
	sync.Mutex
	w *bufio.Writer
}{w: bufio.NewWriter(os.Stdout)}

// say prints one line on stdout and flushes it: the test reads these as they come.
func say(format string, args ...any) {
	out.Lock()
	defer out.Unlock()
	fmt.Fprintf(out.w, format+"\n", args...)
	out.w.Flush()
}

type stream struct {
	updates chan *workload.X509SVIDResponse
	done    <-chan struct{}
}

type agent struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	dir string

	mu      sync.Mutex
	current *workload.X509SVIDResponse
	refuse  codes.Code
	streams map[int]stream
	nextID  int
	// Closed (and replaced) by the close command: every stream open at that moment ends.
	closeAll chan struct{}
}

func (a *agent) FetchX509SVID(_ *workload.X509SVIDRequest, s workload.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
	md, _ := metadata.FromIncomingContext(s.Context())
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		say("refused stream: no workload.spiffe.io metadata")
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	a.mu.Lock()
	if a.refuse != codes.OK {
		code := a.refuse
		a.mu.Unlock()
		say("refused stream: %s", code)
		return status.Error(code, "refused on command")
	}
	id := a.nextID
	a.nextID++
	st := stream{updates: make(chan *workload.X509SVIDResponse, 64), done: s.Context().Done()}
	a.streams[id] = st
	first, kill := a.current, a.closeAll
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.streams, id)
		a.mu.Unlock()
	}()
	say("stream %d opened", id)
	if err := s.Send(first); err != nil {
		return err
	}
	for {
		select {
		case r := <-st.updates:
			if err := s.Send(r); err != nil {
				return err
			}
		case <-kill:
			say("stream %d closed on command", id)
			return status.Error(codes.Unavailable, "stream closed on command")
		case <-s.Context().Done():
			say("stream %d gone", id)
			return nil
		}
	}
}

// push reloads DIR and queues the response on every open stream; it returns how many.
func (a *agent) push() (int, error) {
	r, err := load(a.dir)
	if err != nil {
		return 0, err
	}
	a.mu.Lock()
	a.current = r
	targets := make([]stream, 0, len(a.streams))
	for _, s := range a.streams {
		targets = append(targets, s)
	}
	a.mu.Unlock()
	for _, s := range targets {
		select {
		case s.updates <- r:
		case <-s.done:
		}
	}
	return len(targets), nil
}

// item reads DIR/NAME.der raw, else DIR/NAME.pem with its blocks decoded; each element of the
// result is one PEM block (or the whole .der file).
func item(path string) ([][]byte, error) {
	if raw, err := os.ReadFile(path + ".der"); err == nil {
		return [][]byte{raw}, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	text, err := os.ReadFile(path + ".pem")
	if err != nil {
		return nil, err
	}
	var blocks [][]byte
	for {
		var b *pem.Block
		b, text = pem.Decode(text)
		if b == nil {
			break
		}
		blocks = append(blocks, b.Bytes)
	}
	if len(blocks) == 0 {
		return nil, fmt.Errorf("%s.pem holds no PEM block", path)
	}
	return blocks, nil
}

func concat(path string) ([]byte, error) {
	blocks, err := item(path)
	if err != nil {
		return nil, err
	}
	var all []byte
	for _, b := range blocks {
		all = append(all, b...)
	}
	return all, nil
}

// names lists DIR's entries, with .pem/.der cut off, sorted and without duplicates.
func names(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []string
	for _, e := range entries {
		n := strings.TrimSuffix(strings.TrimSuffix(e.Name(), ".pem"), ".der")
		if !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out, nil
}

func load(dir string) (*workload.X509SVIDResponse, error) {
	r := &workload.X509SVIDResponse{FederatedBundles: map[string][]byte{}}
	svids, err := names(filepath.Join(dir, "svids"))
	if err != nil {
		return nil, err
	}
	for _, n := range svids {
		base := filepath.Join(dir, "svids", n)
		id, err := os.ReadFile(filepath.Join(base, "id"))
		if err != nil {
			return nil, err
		}
		svid := &workload.X509SVID{SpiffeId: strings.TrimSpace(string(id))}
		if svid.X509Svid, err = concat(filepath.Join(base, "chain")); err != nil {
			return nil, err
		}
		if svid.X509SvidKey, err = concat(filepath.Join(base, "key")); err != nil {
			return nil, err
		}
		if svid.Bundle, err = concat(filepath.Join(base, "bundle")); err != nil {
			return nil, err
		}
		if hint, err := os.ReadFile(filepath.Join(base, "hint")); err == nil {
			svid.Hint = strings.TrimSpace(string(hint))
		}
		r.Svids = append(r.Svids, svid)
	}
	federated, err := names(filepath.Join(dir, "federated"))
	if err != nil {
		return nil, err
	}
	for _, td := range federated {
		if r.FederatedBundles["spiffe://"+td], err = concat(filepath.Join(dir, "federated", td)); err != nil {
			return nil, err
		}
	}
	crls, err := names(filepath.Join(dir, "crls"))
	if err != nil {
		return nil, err
	}
	for _, n := range crls {
		blocks, err := item(filepath.Join(dir, "crls", n))
		if err != nil {
			return nil, err
		}
		r.Crl = append(r.Crl, blocks...)
	}
	return r, nil
}

func listen(network, addr string) net.Listener {
	if network == "unix" {
		// The previous agent on this path may have been killed without cleaning up.
		_ = os.Remove(addr)
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "listen %s %s: %v\n", network, addr, err)
		os.Exit(1)
	}
	return l
}

func serve(args []string) {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	dir := fs.String("dir", "", "material directory")
	unixPath := fs.String("unix", "", "Unix socket path")
	tcpAddr := fs.String("tcp", "", "TCP address (IP:PORT) to listen on as well")
	_ = fs.Parse(args)
	first, err := load(*dir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "load %s: %v\n", *dir, err)
		os.Exit(1)
	}
	a := &agent{dir: *dir, current: first, streams: map[int]stream{}, closeAll: make(chan struct{})}
	srv := grpc.NewServer()
	workload.RegisterSpiffeWorkloadAPIServer(srv, a)
	if *unixPath != "" {
		l := listen("unix", *unixPath)
		go func() { _ = srv.Serve(l) }()
		say("listening unix %s", *unixPath)
	}
	if *tcpAddr != "" {
		l := listen("tcp", *tcpAddr)
		go func() { _ = srv.Serve(l) }()
		say("listening tcp %s", l.Addr())
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		fields := strings.Fields(in.Text())
		if len(fields) == 0 {
			continue
		}
		switch fields[0] {
		case "push":
			n, err := a.push()
			if err != nil {
				say("push failed: %v", err)
			} else {
				say("pushed to %d streams", n)
			}
		case "close":
			a.mu.Lock()
			close(a.closeAll)
			a.closeAll = make(chan struct{})
			a.mu.Unlock()
			say("closed")
		case "refuse":
			code := map[string]codes.Code{
				"ok": codes.OK, "unavailable": codes.Unavailable,
				"permission_denied": codes.PermissionDenied, "invalid_argument": codes.InvalidArgument,
			}
			c, ok := code[strings.Join(fields[1:], "")]
			if !ok {
				say("unknown code %q", strings.Join(fields[1:], " "))
				continue
			}
			a.mu.Lock()
			a.refuse = c
			a.mu.Unlock()
			say("refusing %s", c)
		default:
			say("unknown command %q", fields[0])
		}
	}
	// stdin closed: the test is done with us.
	srv.Stop()
}

func probe(args []string) {
	fs := flag.NewFlagSet("probe", flag.ExitOnError)
	unixPath := fs.String("unix", "", "Unix socket path")
	header := fs.Bool("header", true, "send the workload.spiffe.io metadata")
	_ = fs.Parse(args)
	conn, err := grpc.NewClient("unix://"+*unixPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Printf("error dial: %v\n", err)
		os.Exit(1)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if *header {
		ctx = metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
	}
	s, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	var r *workload.X509SVIDResponse
	if err == nil {
		r, err = s.Recv()
	}
	if err != nil {
		fmt.Printf("error %s: %s\n", status.Code(err), status.Convert(err).Message())
		os.Exit(1)
	}
	if len(r.Svids) == 0 {
		fmt.Println("error empty: the response holds no SVID")
		os.Exit(1)
	}
	fmt.Printf("ok %s\n", r.Svids[0].SpiffeId)
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: workloadapi serve -dir DIR -unix PATH [-tcp IP:PORT] | probe -unix PATH [-header=false]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2:])
	case "probe":
		probe(os.Args[2:])
	default:
		fmt.Fprintf(os.Stderr, "unknown mode %q\n", os.Args[1])
		os.Exit(2)
	}
}
