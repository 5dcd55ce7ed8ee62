//! brpc's `RpcMeta` (src/brpc/policy/baidu_rpc_meta.proto), as prost messages.
//!
//! Every field is a proto2 `optional`, so presence is preserved: re-encoding a decoded meta
//! writes exactly the fields the sender wrote, in field-number order — which is how a stock brpc
//! peer's bytes are reproduced. Unknown fields (e.g. the reserved 100/101) are skipped by prost.

use std::collections::BTreeMap;

/// The metadata that precedes every baidu_std payload.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcMeta {
    #[prost(message, optional, tag = "1")]
    pub request: Option<RpcRequestMeta>,
    #[prost(message, optional, tag = "2")]
    pub response: Option<RpcResponseMeta>,
    /// 0 none, 1 snappy, 2 gzip, 3 zlib, 4 lz4 (payload only).
    #[prost(int32, optional, tag = "3")]
    pub compress_type: Option<i32>,
    #[prost(int64, optional, tag = "4")]
    pub correlation_id: Option<i64>,
    #[prost(int32, optional, tag = "5")]
    pub attachment_size: Option<i32>,
    #[prost(message, optional, tag = "6")]
    pub chunk_info: Option<ChunkInfo>,
    #[prost(bytes = "bytes", optional, tag = "7")]
    pub authentication_data: Option<bytes::Bytes>,
    #[prost(message, optional, tag = "8")]
    pub stream_settings: Option<StreamSettings>,
    #[prost(btree_map = "string, string", tag = "9")]
    pub user_fields: BTreeMap<String, String>,
    /// 0 protobuf, 1 JSON, 2 proto-JSON, 3 proto-text.
    #[prost(int32, optional, tag = "10")]
    pub content_type: Option<i32>,
    /// 0 none, 1 CRC32C.
    #[prost(int32, optional, tag = "11")]
    pub checksum_type: Option<i32>,
    #[prost(bytes = "bytes", optional, tag = "12")]
    pub checksum_value: Option<bytes::Bytes>,
    #[prost(bool, optional, tag = "13")]
    pub checksum_with_attachment: Option<bool>,
}

/// Present in requests only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcRequestMeta {
    /// The protobuf service's full name, e.g. `example.EchoService`.
    #[prost(string, optional, tag = "1")]
    pub service_name: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub method_name: Option<String>,
    #[prost(int64, optional, tag = "3")]
    pub log_id: Option<i64>,
    #[prost(int64, optional, tag = "4")]
    pub trace_id: Option<i64>,
    #[prost(int64, optional, tag = "5")]
    pub span_id: Option<i64>,
    #[prost(int64, optional, tag = "6")]
    pub parent_span_id: Option<i64>,
    #[prost(string, optional, tag = "7")]
    pub request_id: Option<String>,
    /// The caller's timeout for this call.
    #[prost(int32, optional, tag = "8")]
    pub timeout_ms: Option<i32>,
}

/// Present in responses only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcResponseMeta {
    #[prost(int32, optional, tag = "1")]
    pub error_code: Option<i32>,
    #[prost(string, optional, tag = "2")]
    pub error_text: Option<String>,
}

/// Chunked mode; decoded so it is not lost, otherwise unused.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChunkInfo {
    #[prost(int64, optional, tag = "1")]
    pub stream_id: Option<i64>,
    #[prost(int64, optional, tag = "2")]
    pub chunk_id: Option<i64>,
}

/// Streaming RPC settings; decoded so they are not lost, otherwise unused.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamSettings {
    #[prost(int64, optional, tag = "1")]
    pub stream_id: Option<i64>,
    #[prost(bool, optional, tag = "2")]
    pub need_feedback: Option<bool>,
    #[prost(bool, optional, tag = "3")]
    pub writable: Option<bool>,
    #[prost(int64, repeated, packed = "false", tag = "4")]
    pub extra_stream_ids: Vec<i64>,
}
