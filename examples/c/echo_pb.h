/* EchoRequest / EchoResponse from brpc's example/echo_c++/echo.proto: one field,
 * `string message = 1`. A real service uses the code protoc generates; this one field is
 * encoded by hand to keep the examples free of dependencies. */
#ifndef ECHO_PB_H
#define ECHO_PB_H

#include <stddef.h>
#include <stdint.h>

/* Writes field 1 (tag 0x0A, varint length, bytes) into `out`; returns the length, 0 if it
 * does not fit. */
static inline size_t echo_encode(const char *message, size_t len, uint8_t *out, size_t cap) {
    size_t n = 0;
    if (cap < len + 11) return 0;
    out[n++] = 0x0A;
    for (size_t v = len; ; v >>= 7) {
        out[n++] = (uint8_t)((v & 0x7F) | (v > 0x7F ? 0x80 : 0));
        if (v <= 0x7F) break;
    }
    for (size_t i = 0; i < len; i++) out[n++] = (uint8_t)message[i];
    return n;
}

/* Finds field 1 in `buf`; sets *message and *len. Returns 0 on success, -1 if malformed. */
static inline int echo_decode(const uint8_t *buf, size_t size, const char **message, size_t *len) {
    *message = "";
    *len = 0;
    if (size == 0) return 0; /* all fields at their defaults */
    if (buf[0] != 0x0A) return -1;
    size_t value = 0, i = 1;
    for (int shift = 0; i < size && shift < 64; shift += 7) {
        value |= (size_t)(buf[i] & 0x7F) << shift;
        if (!(buf[i++] & 0x80)) break;
    }
    if (value > size - i) return -1;
    *message = (const char *)buf + i;
    *len = value;
    return 0;
}

#endif
