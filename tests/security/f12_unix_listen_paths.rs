//! Finding 12, second part: a Unix listen path is removed whatever it is, and the socket's mode is the umask's.
