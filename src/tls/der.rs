//! The two facts meter-sync reads from an X.509 certificate itself, with a DER
//! walk of a few dozen lines rather than an X.509 crate on every gateway: when it
//! expires (the heartbeat's `cert_expires_at`), and which hash its signature uses
//! (the `tls-server-end-point` channel binding of RFC 5929 for the rustls
//! backend; OpenSSL computes that one itself). Both backends use the same walk, so
//! the heartbeat reports the same instant whichever is compiled in.
//!
//! Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
//! TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature,
//!                               issuer, validity, ... }
//! Validity ::= SEQUENCE { notBefore Time, notAfter Time }

use std::time::{Duration, SystemTime};

/// One DER element: its tag, its contents, and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form: the low bits say how many length bytes follow (at most 4 here:
        // a certificate is far below 4 GiB).
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const VERSION: u8 = 0xa0;
#[cfg_attr(not(feature = "rustls"), allow(dead_code))]
const OID: u8 = 0x06;

/// The contents of the element at the start of `input` if it has tag `want`, and
/// what follows the element.
fn tagged(input: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
    let (tag, contents, rest) = element(input)?;
    (tag == want).then_some((contents, rest))
}

/// The contents of the certificate's tbsCertificate, and what follows it.
fn parts(cert: &[u8]) -> Option<(&[u8], &[u8])> {
    let (outer, _) = tagged(cert, SEQUENCE)?;
    tagged(outer, SEQUENCE)
}

/// The certificate's notAfter, or None if `cert` is not a DER certificate.
pub fn not_after(cert: &[u8]) -> Option<SystemTime> {
    let (tbs, _) = parts(cert)?;
    // The first element is the optional [0] version, or else already the serial.
    let (tag, _, mut rest) = element(tbs)?;
    if tag == VERSION {
        let (_, _, after_serial) = element(rest)?;
        rest = after_serial;
    }
    let (_, _, rest) = element(rest)?; // signature AlgorithmIdentifier
    let (_, _, rest) = element(rest)?; // issuer
    let (validity, _) = tagged(rest, SEQUENCE)?;
    let (_, _, after_not_before) = element(validity)?;
    let (tag, time, _) = element(after_not_before)?;
    parse_time(tag, time)
}

/// UTCTime `YYMMDDHHMMSSZ` (years 1950–2049) or GeneralizedTime `YYYYMMDDHHMMSSZ`,
/// as RFC 5280 requires them in certificates (UTC, seconds, no fraction).
fn parse_time(tag: u8, text: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(text).ok()?;
    let digits = text.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, digits.len()) {
        (UTC_TIME, 12) => {
            let yy: i64 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (GENERALIZED_TIME, 14) => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let n = |i: usize| -> Option<i64> { rest[i..i + 2].parse().ok() };
    let (month, day, hour, min, sec) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec;
    if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The hash of `tls-server-end-point` (RFC 5929 §4.1): the one of the
/// certificate's signature algorithm, except that MD5 and SHA-1 become SHA-256.
#[cfg_attr(not(feature = "rustls"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndPointHash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// The end-point hash for the certificate's signatureAlgorithm, or None for an
/// algorithm without one (RSASSA-PSS, Ed25519: PostgreSQL's server cannot bind
/// those either, so SCRAM-SHA-256-PLUS is not possible with them).
#[cfg_attr(not(feature = "rustls"), allow(dead_code))]
pub fn end_point_hash(cert: &[u8]) -> Option<EndPointHash> {
    let (_, after_tbs) = parts(cert)?;
    let (alg, _) = tagged(after_tbs, SEQUENCE)?;
    let (oid, _) = tagged(alg, OID)?;
    // 1.2.840.113549.1.1.x (PKCS #1 RSA) and 1.2.840.10045.4.x (ECDSA).
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    use EndPointHash::*;
    if oid == ECDSA_SHA1 {
        return Some(Sha256);
    }
    let (prefix, last) = oid.split_at(oid.len().checked_sub(1)?);
    match (prefix, last[0]) {
        // md5WithRSA (4), sha1WithRSA (5): SHA-256 by the RFC's rule.
        (RSA, 4 | 5 | 11) => Some(Sha256),
        (RSA, 12) => Some(Sha384),
        (RSA, 13) => Some(Sha512),
        (RSA, 14) => Some(Sha224),
        (ECDSA_SHA2, 1) => Some(Sha224),
        (ECDSA_SHA2, 2) => Some(Sha256),
        (ECDSA_SHA2, 3) => Some(Sha384),
        (ECDSA_SHA2, 4) => Some(Sha512),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn times_in_both_encodings() {
        assert_eq!(parse_time(UTC_TIME, b"700101000000Z"), Some(at(0)));
        // 2021-01-01T00:00:00Z
        assert_eq!(
            parse_time(UTC_TIME, b"210101000000Z"),
            Some(at(1_609_459_200))
        );
        assert_eq!(
            parse_time(GENERALIZED_TIME, b"20210101000000Z"),
            Some(at(1_609_459_200))
        );
        // 2050 and later must be GeneralizedTime; UTCTime 50 is 1950.
        assert_eq!(
            parse_time(GENERALIZED_TIME, b"20500301120000Z"),
            Some(at(2_529_748_800))
        );
        assert!(parse_time(UTC_TIME, b"500101000000Z").unwrap() < SystemTime::UNIX_EPOCH);
        for bad in [
            &b"2101010000Z"[..],
            b"210101000000",
            b"211301000000Z",
            b"21010100000aZ",
        ] {
            assert_eq!(parse_time(UTC_TIME, bad), None, "{bad:?}");
        }
    }

    /// Certificates made by OpenSSL with a given notAfter and signature hash: the
    /// walk must read what OpenSSL wrote, in both time encodings.
    #[cfg(feature = "native-tls")]
    #[test]
    fn reads_what_openssl_writes() {
        use openssl::asn1::Asn1Time;
        use openssl::bn::BigNum;
        use openssl::hash::MessageDigest;
        use openssl::pkey::PKey;
        use openssl::rsa::Rsa;
        use openssl::x509::{X509Builder, X509NameBuilder};

        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let ec = PKey::from_ec_key(
            openssl::ec::EcKey::generate(
                &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)
                    .unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        let make =
            |not_after: u64, md: MessageDigest, key: &PKey<openssl::pkey::Private>, v3: bool| {
                let mut b = X509Builder::new().unwrap();
                if v3 {
                    b.set_version(2).unwrap();
                }
                let mut name = X509NameBuilder::new().unwrap();
                name.append_entry_by_text("CN", "gw-1").unwrap();
                let name = name.build();
                b.set_subject_name(&name).unwrap();
                b.set_issuer_name(&name).unwrap();
                b.set_pubkey(key).unwrap();
                b.set_serial_number(&BigNum::from_u32(7).unwrap().to_asn1_integer().unwrap())
                    .unwrap();
                b.set_not_before(&Asn1Time::from_unix(0).unwrap()).unwrap();
                b.set_not_after(&Asn1Time::from_unix(not_after as i64).unwrap())
                    .unwrap();
                b.sign(key, md).unwrap();
                b.build().to_der().unwrap()
            };
        use EndPointHash::*;
        for (secs, md, k, v3, hash) in [
            // 2027-06-30T12:34:56Z: UTCTime.
            (1_814_445_296, MessageDigest::sha256(), &key, true, Sha256),
            // 2051-01-01T00:00:00Z: GeneralizedTime.
            (2_556_144_000, MessageDigest::sha384(), &key, true, Sha384),
            (1_814_445_296, MessageDigest::sha512(), &key, false, Sha512),
            (1_814_445_296, MessageDigest::sha1(), &key, true, Sha256),
            (1_814_445_296, MessageDigest::sha256(), &ec, true, Sha256),
            (1_814_445_296, MessageDigest::sha384(), &ec, true, Sha384),
        ] {
            let der = make(secs, md, k, v3);
            assert_eq!(not_after(&der), Some(at(secs)), "{hash:?} v3={v3}");
            assert_eq!(end_point_hash(&der), Some(hash), "{secs}");
        }
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        for bad in [&[][..], &[0x30], &[0x30, 0x82, 0xff], b"not DER at all"] {
            assert_eq!(not_after(bad), None);
            assert_eq!(end_point_hash(bad), None);
        }
    }
}
