// Upper-cases its input. zig 0.17 (the server's toolchain): main takes std.process.Init,
// whose io reads stdin and writes stdout.
const std = @import("std");

pub fn main(init: std.process.Init) !void {
    const io = init.io;
    var buf: [4096]u8 = undefined;
    var vec = [_][]u8{buf[0..]};
    var n: usize = 0;
    while (n < buf.len) {
        vec[0] = buf[n..];
        const got = std.Io.File.stdin().readStreaming(io, &vec) catch |err| switch (err) {
            error.EndOfStream => break,
            else => return err,
        };
        n += got;
    }
    for (buf[0..n]) |*c| c.* = std.ascii.toUpper(c.*);
    const out = std.Io.File.stdout();
    try out.writeStreamingAll(io, buf[0..n]);
    try out.writeStreamingAll(io, "\n");
}
