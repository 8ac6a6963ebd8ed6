// A single-file Go function: the input arrives on stdin, the output is stdout.
// GREETING comes from the version's environment (fn register --env GREETING=...).
package main

import (
	"fmt"
	"io"
	"os"
)

func main() {
	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "cannot read the input:", err)
		os.Exit(1)
	}
	greeting := os.Getenv("GREETING")
	if greeting == "" {
		greeting = "hello"
	}
	fmt.Printf("%s, %s\n", greeting, in)
}
