//! The RESUME proof: HMAC-SHA256 keyed with the session secret, over everything the
//! RESUME asserts and the daemon's nonce of the moment.
//!
//! ```text
//! proof = HMAC-SHA256(secret, "domsock-session-resume-v1" || session id (16)
//!                              || server nonce (16) || client nonce (16)
//!                              || received (le64) || shutdown bits (u8))
//! ```
//!
//! The daemon issues a fresh server nonce with OPENED and with every RESUMED, and forgets
//! the old one once a resume succeeds, so a recorded RESUME never verifies twice; the
//! client nonce keeps the guest from ever computing a proof an observer chose for it. The
//! secret itself never crosses the wire after OPENED. Verification is constant-time
//! (`hmac`'s `verify_slice`).

use super::wire::Closed;
use super::{Nonce, Secret, SessionId, Tag};
use hmac::{Hmac, Mac};
use sha2::Sha256;

const LABEL: &[u8] = b"domsock-session-resume-v1";

/// What a RESUME proof covers.
#[derive(Debug, Clone, Copy)]
pub struct ResumeClaim {
    /// The session.
    pub id: SessionId,
    /// The daemon's current nonce for it.
    pub server_nonce: Nonce,
    /// The guest's fresh nonce.
    pub client_nonce: Nonce,
    /// What the guest says it has received.
    pub received: u64,
    /// What the guest says it has closed.
    pub closed: Closed,
}

impl ResumeClaim {
    fn mac(&self, secret: &Secret) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&secret.0).expect("HMAC takes keys of any length");
        mac.update(LABEL);
        mac.update(&self.id.0);
        mac.update(&self.server_nonce.0);
        mac.update(&self.client_nonce.0);
        mac.update(&self.received.to_le_bytes());
        mac.update(&[u8::from(self.closed.send) | (u8::from(self.closed.rcv) << 1)]);
        mac
    }

    /// The proof a holder of `secret` sends.
    pub fn prove(&self, secret: &Secret) -> Tag {
        let bytes = self.mac(secret).finalize().into_bytes();
        let mut t = [0u8; 32];
        t.copy_from_slice(&bytes);
        Tag(t)
    }

    /// Whether `tag` proves knowledge of `secret` for exactly this claim (constant time).
    pub fn verify(&self, secret: &Secret, tag: &Tag) -> bool {
        self.mac(secret).verify_slice(&tag.0).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> ResumeClaim {
        ResumeClaim {
            id: SessionId([1; 16]),
            server_nonce: Nonce([2; 16]),
            client_nonce: Nonce([3; 16]),
            received: 4096,
            closed: Closed::default(),
        }
    }

    #[test]
    fn a_proof_verifies_only_for_its_secret_and_claim() {
        let secret = Secret([9; 32]);
        let tag = claim().prove(&secret);
        assert!(claim().verify(&secret, &tag));
        assert!(!claim().verify(&Secret([8; 32]), &tag));
        let mut other = claim();
        other.received += 1;
        assert!(!other.verify(&secret, &tag), "received is covered");
        let mut other = claim();
        other.server_nonce = Nonce([0; 16]);
        assert!(
            !other.verify(&secret, &tag),
            "a new server nonce voids old proofs"
        );
        let mut other = claim();
        other.closed.send = true;
        assert!(!other.verify(&secret, &tag), "shutdown bits are covered");
        let mut bad = tag;
        bad.0[31] ^= 1;
        assert!(!claim().verify(&secret, &bad));
    }

    #[test]
    fn known_answer() {
        // Pins the construction (label, field order, encodings): a change here breaks
        // every guest library already deployed.
        let tag = claim().prove(&Secret([9; 32]));
        let hex: String = tag.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, KNOWN);
    }

    /// Computed independently with Python: `hmac.new(bytes([9]*32), label + fields, sha256)`.
    const KNOWN: &str = "a3cb5e0a8da511c444313e214b242400504604c1d8afe5e389e29627ea4a4804";
}
