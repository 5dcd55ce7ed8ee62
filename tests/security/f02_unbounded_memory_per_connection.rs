//! Finding 2: Memory is unbounded per connection.
