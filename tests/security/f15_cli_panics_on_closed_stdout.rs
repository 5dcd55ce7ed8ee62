//! Finding 15: The CLI panics on a closed stdout.
