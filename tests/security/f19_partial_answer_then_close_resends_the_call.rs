//! Finding 19: a call could run twice when the server closed cleanly after part of its answer.
//!
//! Both clients send a call once more on a new connection when the server closes cleanly
//! (close_notify) without answering it: a server that closes cleanly has answered everything
//! it read, so the call never ran. A close_notify that comes after part of the answer frame
//! was counted as such a clean close too, although the server had started answering and the
//! call had run: a method that is not idempotent (a payment, a write) ran twice. A close with
//! part of a frame in is no longer clean, and the call fails instead.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use trustwire::rpc::blocking::{BlockingClient, Failure};
use trustwire::{CallOptions, ClientOptions};

use crate::common::raw::{answer, raw_server, read_request};
use crate::common::*;

fn within_5s() -> CallOptions {
    CallOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() }
}

#[test]
fn a_close_notify_after_part_of_the_answer_does_not_send_the_call_again() {
    let pki = Pki::new();
    // Reads the call, sends half of its answer, then closes cleanly.
    let (addr, accepted) = raw_server(&pki, |mut s| async move {
        let req = read_request(&mut s).await;
        let whole = answer(req.meta.correlation_id.unwrap(), &[5u8; 1000]);
        s.write_all(&whole[..whole.len() / 2]).await.unwrap();
        s.flush().await.unwrap();
        let _ = s.shutdown().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    });

    let mut blocking =
        BlockingClient::new(addr.to_string(), pki.client_profile().client().unwrap(), ClientOptions::default());
    let r = blocking.call("t.Raw", "Echo", vec![], within_5s(), &mut || Ok::<(), ()>(()));
    assert!(matches!(r, Err(Failure::Error(trustwire::Error::Transport { .. }))), "half an answer is no answer: {r:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the blocking client sent the call once");

    let multiplexed = client(addr, &pki.client_profile());
    let r = trustwire::runtime::runtime().block_on(multiplexed.call("t.Raw", "Echo", vec![], within_5s()));
    assert!(r.is_err(), "half an answer is no answer");
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the multiplexed client sent the call once");
}
