/* Counts the words, lines and bytes of its input, like wc. Built to WebAssembly with
   zig cc -target wasm32-wasi: the C library is wasi-libc. */
#include <ctype.h>
#include <stdio.h>

int main(void) {
    long bytes = 0, words = 0, lines = 0;
    int c, in_word = 0;
    while ((c = getchar()) != EOF) {
        bytes++;
        if (c == '\n') lines++;
        if (isspace(c)) {
            in_word = 0;
        } else if (!in_word) {
            in_word = 1;
            words++;
        }
    }
    printf("%ld %ld %ld\n", lines, words, bytes);
    return 0;
}
