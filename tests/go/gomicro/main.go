// A go-micro service and client for the proxy tests: the service answers Greeter.Hello on a
// fixed plaintext address; the client calls a fixed address (a trustwire client-side proxy),
// so no registry lookup is involved.
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"go-micro.dev/v4"
	"go-micro.dev/v4/client"
	"go-micro.dev/v4/registry"
	"go-micro.dev/v4/server"
)

type Request struct {
	Name string `json:"name"`
}

type Response struct {
	Greeting string `json:"greeting"`
}

type Greeter struct{}

func (g *Greeter) Hello(ctx context.Context, req *Request, rsp *Response) error {
	rsp.Greeting = "hello " + req.Name
	return nil
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: gomicropeer server ADDR | client ADDR NAME")
		os.Exit(2)
	}
	reg := registry.NewMemoryRegistry()
	switch os.Args[1] {
	case "server":
		svc := micro.NewService(
			micro.Name("greeter"),
			micro.Address(os.Args[2]),
			micro.Registry(reg),
		)
		svc.Init()
		if err := micro.RegisterHandler(svc.Server(), new(Greeter)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		go func() {
			time.Sleep(60 * time.Second)
			os.Exit(0)
		}()
		if err := svc.Run(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "client":
		c := client.NewClient(client.Registry(reg), client.ContentType("application/json"))
		req := c.NewRequest("greeter", "Greeter.Hello", &Request{Name: os.Args[3]})
		var rsp Response
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := c.Call(ctx, req, &rsp, client.WithAddress(os.Args[2])); err != nil {
			fmt.Println("error", err)
			os.Exit(3)
		}
		fmt.Println(rsp.Greeting)
	}
	_ = server.DefaultServer
}
