mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_round_trip_over_mtls() {
    let pki = Pki::new();
    let server = echo_server(&pki.server_profile()).await;
    let c = client(server.local_addr(), &pki.client_profile());
    assert_eq!(echo(&c, "hello").await.unwrap(), "hello");
    let id = c.server_identity().await.unwrap().unwrap();
    assert_eq!(id.spiffe_id.as_deref(), Some(SERVER_ID));
}
