//! Throwaway PKI for one control plane: a serving CA and certificate for the apiserver, a client CA with an
//! `admin` user in `system:masters`, and the service-account signing key. Generated fresh for every control
//! plane so nothing secret is committed or shared between runs.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

pub struct Pki {
    pub serving_ca_pem: String,
    pub serving_cert_path: PathBuf,
    pub serving_key_path: PathBuf,
    pub client_ca_path: PathBuf,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
    pub service_account_key_path: PathBuf,
    pub service_account_pub_path: PathBuf,
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl Pki {
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let write = |name: &str, contents: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, contents)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };

        let serving_ca_key = KeyPair::generate()?;
        let serving_ca_params = ca_params("mcpfly-local_cluster-serving-ca");
        let serving_ca_cert = serving_ca_params.self_signed(&serving_ca_key)?;
        let serving_issuer = Issuer::new(serving_ca_params, serving_ca_key);

        let serving_key = KeyPair::generate()?;
        let mut serving = CertificateParams::new(vec!["localhost".to_string()])?;
        serving
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        serving
            .subject_alt_names
            .push(SanType::IpAddress("10.0.0.1".parse()?));
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &serving_issuer)?;

        let client_ca_key = KeyPair::generate()?;
        let client_ca_params = ca_params("mcpfly-local_cluster-client-ca");
        let client_ca_cert = client_ca_params.self_signed(&client_ca_key)?;
        let client_issuer = Issuer::new(client_ca_params, client_ca_key);

        let admin_key = KeyPair::generate()?;
        let mut admin = CertificateParams::default();
        admin.distinguished_name = DistinguishedName::new();
        admin.distinguished_name.push(DnType::CommonName, "admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin.signed_by(&admin_key, &client_issuer)?;

        let service_account_key = KeyPair::generate()?;

        Ok(Self {
            serving_ca_pem: serving_ca_cert.pem(),
            serving_cert_path: write("apiserver.crt", &serving_cert.pem())?,
            serving_key_path: write("apiserver.key", &serving_key.serialize_pem())?,
            client_ca_path: write("client-ca.crt", &client_ca_cert.pem())?,
            admin_cert_pem: admin_cert.pem(),
            admin_key_pem: admin_key.serialize_pem(),
            service_account_key_path: write(
                "service-account.key",
                &service_account_key.serialize_pem(),
            )?,
            // The verifying side only parses public keys (not PKCS#8 private keys).
            service_account_pub_path: write(
                "service-account.pub",
                &service_account_key.public_key_pem(),
            )?,
        })
    }
}
