//! Finding 6: Leaves issued by an intermediate cannot be revoked: a CRL was accepted only when
//! a root in the bundle signed it, so an intermediate's CRL was refused at load.
//!
//! Root → intermediate → leaf, built with the `openssl` command; the intermediate's CRL revokes
//! one leaf. The store accepts that CRL and the revoked leaf is refused as `revoked`, while its
//! sibling from the same intermediate still connects.

use std::path::Path;
use std::process::Command;

use trustwire::credentials::{CredentialStore, IdentitySource, PemSource, Sources, StoreOptions, Use};
use trustwire::rpc::Server;
use trustwire::tls::{Identity, TlsProfile, TrustBundle};
use trustwire::Verdict;

use crate::common::peers::{server_verdict, tool_available};
use crate::common::*;

const SCRIPT: &str = r#"
set -e
ec="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
openssl req -x509 $ec -keyout root.key -out root.pem -days 30 -subj "/CN=f06 root" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
openssl req $ec -keyout int.key -out int.csr -subj "/CN=f06 intermediate"
printf "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" > int.ext
openssl x509 -req -in int.csr -CA root.pem -CAkey root.key -set_serial 0x2001 -out int.pem -days 30 -extfile int.ext
for n in revoked good; do
  openssl req $ec -keyout $n.key -out $n.csr -subj "/CN=f06 $n"
  printf "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=URI:spiffe://example.org/ns/test/$n\nauthorityKeyIdentifier=keyid\n" > $n.ext
  serial=0x3002; [ $n = revoked ] && serial=0x3001
  openssl x509 -req -in $n.csr -CA int.pem -CAkey int.key -set_serial $serial -out $n.pem -days 30 -extfile $n.ext
done
: > index.txt
echo 1000 > crlnumber
printf "[ca]\ndefault_ca = int\n[int]\ndatabase = index.txt\ncrlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 7\n" > ca.cnf
openssl ca -batch -config ca.cnf -keyfile int.key -cert int.pem -revoke revoked.pem
openssl ca -batch -config ca.cnf -keyfile int.key -cert int.pem -gencrl -out int.crl
# A CRL naming the root as its issuer, signed by another key.
openssl req -x509 $ec -keyout fake.key -out fake.pem -days 30 -subj "/CN=f06 root" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
: > index.txt
openssl ca -batch -config ca.cnf -keyfile fake.key -cert fake.pem -gencrl -out forged-root.crl
"#;

fn client_identity(dir: &Path, name: &str) -> Identity {
    let mut chain = std::fs::read(dir.join(format!("{name}.pem"))).unwrap();
    chain.extend(std::fs::read(dir.join("int.pem")).unwrap());
    Identity::from_pem(&chain, &std::fs::read(dir.join(format!("{name}.key"))).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediates_crl_revokes_the_leaves_it_issued() {
    if !tool_available(Command::new("openssl").arg("version"), "f06: openssl") {
        return;
    }
    let pki = Pki::new();
    let dir = pki.path("openssl");
    std::fs::create_dir(&dir).unwrap();
    let out = Command::new("bash").arg("-c").arg(SCRIPT).current_dir(&dir).output().unwrap();
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));

    let sources = Sources {
        identity: IdentitySource::Files { chain: pki.path("server.pem"), key: pki.path("server.key") },
        trust: vec![PemSource::Path(pki.path("ca.pem")), PemSource::Path(dir.join("root.pem"))],
        crls: vec![PemSource::Path(dir.join("int.crl"))],
        ..Sources::default()
    };
    let options = StoreOptions { watch: false, poll_interval: None, ..StoreOptions::default() };
    let store = CredentialStore::new(Use::Server, sources, TlsProfile::new(None, TrustBundle::default()), options)
        .expect("the intermediate's CRL is accepted");
    assert_eq!(store.generation().crls.len(), 1);

    let seen: std::sync::Arc<std::sync::Mutex<Vec<trustwire::Error>>> = Default::default();
    let sink = seen.clone();
    let mut server = Server::new(store.server_tls().unwrap());
    trustwire::echo::register(&mut server);
    server.options_mut().on_handshake_error =
        Some(std::sync::Arc::new(move |_, e| sink.lock().unwrap().push(e.clone())));
    let running = server.bind("127.0.0.1:0").await.unwrap();

    let mut cp = pki.client_profile();
    cp.identity = Some(client_identity(&dir, "good"));
    assert_eq!(echo(&client(running.local_addr(), &cp), "ok").await.unwrap(), "ok");

    cp.identity = Some(client_identity(&dir, "revoked"));
    echo(&client(running.local_addr(), &cp), "no").await.expect_err("a revoked leaf connected");
    assert_eq!(server_verdict(&seen).await, Verdict::Revoked);

    // A CRL that names a trusted CA as its issuer must carry that CA's signature.
    let forged = std::fs::read(dir.join("forged-root.crl")).unwrap();
    let err = store.set_crls_pem(&forged).expect_err("a forged CRL was accepted");
    assert_eq!(err.verdict(), Some(Verdict::BadSignature), "{err}");
}
