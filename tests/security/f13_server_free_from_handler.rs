//! Finding 13: tw_server_free from a handler thread races dispatch.
