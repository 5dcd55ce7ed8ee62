//! The three messages of `FetchX509SVID`, as the published `workload.proto` defines them, written
//! out for prost by hand so that building needs no `protoc`.

use std::collections::BTreeMap;

/// The gRPC method path of `SpiffeWorkloadAPI.FetchX509SVID` (the proto has no package).
pub(super) const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";

/// Metadata every request must carry (SPIFFE Workload Endpoint, section 3): an agent refuses a
/// request without it, which keeps a server-side request forgery from reaching the agent.
pub(super) const SECURITY_HEADER: &str = "workload.spiffe.io";

/// `X509SVIDRequest`: no parameters.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct X509SvidRequest {}

/// `X509SVIDResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<X509Svid>,
    /// ASN.1 DER CRLs, one per entry.
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub crl: Vec<Vec<u8>>,
    /// Concatenated ASN.1 DER CA certificates, keyed by the foreign trust domain's SPIFFE ID.
    #[prost(btree_map = "string, bytes", tag = "3")]
    pub federated_bundles: BTreeMap<String, Vec<u8>>,
}

/// `X509SVID`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct X509Svid {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    /// Concatenated ASN.1 DER certificates, leaf first.
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    /// ASN.1 DER PKCS#8 private key, unencrypted.
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    /// Concatenated ASN.1 DER CA certificates of the SVID's trust domain.
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    #[prost(string, tag = "5")]
    pub hint: String,
}
