// A Go module: main imports a package of the module's own (greet/). Dependencies from
// outside the module must be vendored (go mod vendor): builds have no network.
package main

import (
	"fmt"
	"io"
	"os"

	"example.com/greet/greet"
)

func main() {
	in, _ := io.ReadAll(os.Stdin)
	fmt.Println(greet.Greeting(string(in)))
}
