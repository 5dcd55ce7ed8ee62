//! Regression tests for the security review's findings, one module per finding, named after it.
//! Each test fails on the code the finding was made against and passes with its fix.

#[path = "../common/mod.rs"]
mod common;

mod f01_proxy_ignores_method_rules;
mod f02_unbounded_memory_per_connection;
mod f03_client_chosen_authentication_data;
mod f04_any_ca_mints_any_trust_domain;
mod f05_non_ca_bundle_entry_becomes_anchor;
mod f06_intermediate_crls_rejected;
mod f07_unauthenticated_sockets_hold_slots;
mod f08_connections_outlive_certificates;
mod f09_erpcauth_text_lists_allowed_identities;
mod f10_reload_changes_identity_silently;
mod f11_proxy_v2_lengths_wrap;
mod f12_key_file_permissions;
mod f12_unix_listen_paths;
mod f13_server_free_from_handler;
mod f14_cli_flags_replace_profile_trust;
mod f15_cli_panics_on_closed_stdout;
mod f16_unpolled_connection_outlives_trust;
mod f17_trust_change_during_handshake_is_missed;
mod f18_client_side_proxy_streams_untracked;
mod f19_partial_answer_then_close_resends_the_call;
