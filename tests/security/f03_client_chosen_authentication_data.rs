//! Finding 3: Client-chosen authentication_data reaches brpc.
