//! The SRTP AEAD ciphers of the vendored aws-lc-rs backend (str0m-aws-lc-rs patch 3: they
//! encrypt from the packet straight into the output buffer). Known answers from the GCM
//! specification (McGrew and Viega, test cases 4 and 16: AES-128 and AES-256 with associated
//! data), into an output buffer full of garbage, and round trips of a packet-sized payload.

use str0m::crypto::from_feature_flags;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

const KEY: &str = "feffe9928665731c6d6a8f9467308308";
const IV: &str = "cafebabefacedbaddecaf888";
const AAD: &str = "feedfacedeadbeeffeedfacedeadbeefabaddad2";
const PLAIN: &str = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
                     1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39";

fn iv() -> [u8; 12] {
    hex(IV).try_into().expect("12 bytes")
}

/// Encrypts the specification's plaintext with `encrypt` into a buffer of garbage, which must
/// come out as `expected` (ciphertext, then tag).
fn known_answer(encrypt: impl FnOnce(&[u8], &mut [u8]), expected: &str) {
    let plain = hex(PLAIN);
    let mut out = vec![0xa5; plain.len() + 16];
    encrypt(&plain, &mut out);
    assert_eq!(out, hex(expected));
}

#[test]
fn aes_128_gcm_encrypts_to_the_known_answer() {
    let key: [u8; 16] = hex(KEY).try_into().expect("16 bytes");
    let mut cipher = from_feature_flags()
        .srtp_provider
        .aead_aes_128_gcm()
        .create_cipher(key, true);
    known_answer(
        |plain, out| {
            cipher
                .encrypt(&iv(), &hex(AAD), plain, out)
                .expect("encrypt")
        },
        "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e\
         21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091\
         5bc94fbc3221a5db94fae95ae7121a47",
    );
}

#[test]
fn aes_256_gcm_encrypts_to_the_known_answer() {
    let key: [u8; 32] = hex(&format!("{KEY}{KEY}")).try_into().expect("32 bytes");
    let mut cipher = from_feature_flags()
        .srtp_provider
        .aead_aes_256_gcm()
        .create_cipher(key, true);
    known_answer(
        |plain, out| {
            cipher
                .encrypt(&iv(), &hex(AAD), plain, out)
                .expect("encrypt")
        },
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
         8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662\
         76fc6ece0f4e1768cddf8853bb2d551b",
    );
}

#[test]
fn a_packet_sized_payload_round_trips_and_a_flipped_bit_is_refused() {
    let provider = from_feature_flags();
    let key = [7u8; 32];
    let mut enc = provider
        .srtp_provider
        .aead_aes_256_gcm()
        .create_cipher(key, true);
    let mut dec = provider
        .srtp_provider
        .aead_aes_256_gcm()
        .create_cipher(key, false);
    let header = [0x80, 0x60, 0x12, 0x34, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef];
    let payload: Vec<u8> = (0..1187u32).map(|i| (i * 31 % 251) as u8).collect();
    // A larger buffer than needed, as str0m's pool hands out: only the front is written.
    let mut sealed = vec![0xff; payload.len() + 16 + 40];
    enc.encrypt(&iv(), &header, &payload, &mut sealed)
        .expect("encrypt");
    let sealed = &mut sealed[..payload.len() + 16];
    assert_ne!(&sealed[..payload.len()], &payload[..]);
    let mut plain = vec![0; payload.len()];
    let n = dec
        .decrypt(&iv(), &[&header], sealed, &mut plain)
        .expect("decrypt");
    assert_eq!(&plain[..n], &payload[..]);

    sealed[100] ^= 1;
    assert!(dec.decrypt(&iv(), &[&header], sealed, &mut plain).is_err());
}
