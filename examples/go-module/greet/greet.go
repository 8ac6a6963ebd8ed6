// Package greet builds the greeting; it lives in the module, beside main.
package greet

import "strings"

// Greeting greets name, or the world when name is blank.
func Greeting(name string) string {
	name = strings.TrimSpace(name)
	if name == "" {
		name = "world"
	}
	return "greetings, " + name + "!"
}
