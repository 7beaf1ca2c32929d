"""The association key exchange: vectors, both ends agreeing, and every way it must fail."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from hypothesis import given
from hypothesis import strategies as st

from ground.errors import MalformedError
from signalling.cookies import CookieJar
from signalling.handshake import (
    MAX_SLOTS,
    Acceptance,
    Binding,
    Challenge,
    Initiator,
    Offer,
    StaticKey,
    decode_key_untrusted,
    encode_key,
    prove_offer,
    respond,
    tunnel_keys,
)

BINDING = Binding("laptop1", "call-1", 2, 600, None)
COOKIE = bytes(range(20))


def key(seed: int) -> StaticKey:
    return StaticKey.from_private_bytes(bytes([seed]) * 32)


ANCHOR, TERMINAL = key(1), key(2)


def exchange(
    *, psk_c: bytes | None = None, psk_a: bytes | None = None, anchor_key: bytes | None = None
) -> tuple[Initiator, Offer, Acceptance]:
    initiator = Initiator(
        TERMINAL, anchor_key or ANCHOR.public, index=64, encryption=True, psk=psk_c
    )
    offer = initiator.offer(COOKIE, BINDING)
    proven = prove_offer(ANCHOR, offer, BINDING, psk_a)
    acceptance, _keys = respond(proven, index=128, vipa="100.64.0.2", expires=600)
    return initiator, offer, acceptance


def test_x25519_matches_rfc7748_vector() -> None:
    # RFC 7748 §6.1: Alice's private key and Bob's public key give this shared secret.
    alice = StaticKey.from_private_bytes(
        bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob_public = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert alice.public.hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert alice.dh(bob_public).hex() == (
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    )


def test_both_ends_derive_the_same_keys() -> None:
    initiator = Initiator(TERMINAL, ANCHOR.public, index=64, encryption=True)
    offer = initiator.offer(COOKIE, BINDING)
    acceptance, anchor_keys = respond(
        prove_offer(ANCHOR, offer, BINDING), index=128, vipa="100.64.0.2", expires=600
    )
    terminal_keys = initiator.finish(acceptance, "100.64.0.2", 600)
    assert terminal_keys == anchor_keys
    assert (terminal_keys.terminal_index, terminal_keys.anchor_index) == (64, 128)
    assert len({terminal_keys.up, terminal_keys.down, terminal_keys.signing}) == 3
    slots = {tunnel_keys(terminal_keys, s) for s in range(MAX_SLOTS)}
    assert len(slots) == MAX_SLOTS  # every tunnel its own pair
    up, down = tunnel_keys(terminal_keys, 0)
    assert up != down


def test_vector_with_fixed_ephemerals() -> None:
    """The wire protocol pinned down: fixed keys in, these bytes out."""
    initiator = Initiator(
        TERMINAL, ANCHOR.public, index=64, encryption=True, psk=bytes(range(32)), ephemeral=key(3)
    )
    offer = initiator.offer(COOKIE, BINDING)
    assert offer.encode() == (
        f"cookie={encode_key(COOKIE)};e={encode_key(key(3).public)};"
        f"s={encode_key(TERMINAL.public)};idx=64;enc=on;mac={encode_key(offer.mac)}"
    )
    proven = prove_offer(ANCHOR, offer, BINDING, bytes(range(32)))
    acceptance, keys = respond(proven, index=128, vipa="100.64.0.2", expires=600, ephemeral=key(4))
    assert initiator.finish(acceptance, "100.64.0.2", 600) == keys
    assert offer.mac.hex() == VECTOR["offer_mac"]
    assert acceptance.mac.hex() == VECTOR["accept_mac"]
    assert keys.up.hex() == VECTOR["up"]
    assert keys.down.hex() == VECTOR["down"]
    assert keys.signing.hex() == VECTOR["signing"]
    assert tunnel_keys(keys, 1)[0].hex() == VECTOR["slot1_up"]


VECTOR = {
    "offer_mac": "7d8249ccca21d002308db717663ecb78",
    "accept_mac": "d11810dff7acabbda6c214ca3acfbe56",
    "up": "11dea2b332114320ec66d4da0aedd2a3a0aa415216970bd0bc25cdd3db20d2ef",
    "down": "9dd66386bce6f8df01fb69b27ab56034d0fc499079cee1a281a2c096af00c874",
    "signing": "422d8be83fa818353eb2f1ee80bb54c75ea053f288031c5ca6ce9eadedb37791",
    "slot1_up": "be1991e1ea3e82ce1d47c84de54ba732b85bae330744b589e034d336c5b3dff7",
}


def test_vector_recomputed_from_the_documented_layout() -> None:
    """A second, literal computation of the same vector from the primitives."""

    def fields(*items: bytes) -> bytes:
        return b"".join(len(i).to_bytes(4, "big") + i for i in items)

    def hkdf(ikm: bytes, salt: bytes, info: bytes, n: int) -> bytes:
        return HKDF(hashes.SHA256(), n, salt, info).derive(ikm)

    e_c, e_a, psk = key(3), key(4), bytes(range(32))
    t1 = hashlib.sha256(
        b"upmt-kx-v1\0"
        + fields(
            ANCHOR.public, COOKIE, e_c.public, TERMINAL.public, b"64", b"on",
            b"laptop1", b"call-1", b"2", b"600", b"",
        )
    ).digest()  # fmt: skip
    es, ss = e_c.dh(ANCHOR.public), TERMINAL.dh(ANCHOR.public)
    proof = hkdf(es + ss + psk, t1, b"offer", 32)
    assert hmac.new(proof, t1, hashlib.sha256).digest()[:16].hex() == VECTOR["offer_mac"]
    t2 = hashlib.sha256(t1 + fields(e_a.public, b"128", b"100.64.0.2", b"600")).digest()
    ee, se = e_c.dh(e_a.public), TERMINAL.dh(e_a.public)
    okm = hkdf(es + ss + ee + se + psk, t2, b"keys", 128)
    assert hmac.new(okm[96:], t2, hashlib.sha256).digest()[:16].hex() == VECTOR["accept_mac"]
    assert (okm[:32].hex(), okm[32:64].hex(), okm[64:96].hex()) == (
        VECTOR["up"],
        VECTOR["down"],
        VECTOR["signing"],
    )
    slot1 = HKDFExpand(hashes.SHA256(), 32, b"upmt-tunnel-v1\0up\x01").derive(okm[:32])
    assert slot1.hex() == VECTOR["slot1_up"]


def test_offer_and_acceptance_round_trip_through_their_text() -> None:
    _initiator, offer, acceptance = exchange()
    assert Offer.parse_untrusted(offer.encode()) == offer
    assert Acceptance.parse_untrusted(acceptance.encode()) == acceptance
    assert Offer.cookie_of_untrusted(offer.encode()) == COOKIE
    challenge = Challenge(COOKIE, ANCHOR.public, True)
    assert challenge.encode().startswith('UPMT-KX cookie="')


def test_wrong_static_key_or_password_fails_the_proof() -> None:
    impostor = Initiator(key(9), ANCHOR.public, index=64, encryption=True)
    offer = impostor.offer(COOKIE, BINDING)
    # The impostor's own key proves itself, but the anchor pins keys, not this:
    prove_offer(ANCHOR, offer, BINDING)
    # ... a static key swapped into someone else's offer does not check.
    _i, genuine, _a = exchange()
    forged = dataclasses.replace(genuine, static=key(9).public)
    with pytest.raises(MalformedError, match="proof"):
        prove_offer(ANCHOR, forged, BINDING)
    # With a users file the psk (from the password) is part of the proof.
    initiator = Initiator(TERMINAL, ANCHOR.public, index=64, encryption=True, psk=bytes(32))
    offer = initiator.offer(COOKIE, BINDING)
    with pytest.raises(MalformedError, match="proof"):
        prove_offer(ANCHOR, offer, BINDING, bytes([7]) * 32)


def test_offer_for_another_anchor_key_fails() -> None:
    initiator = Initiator(TERMINAL, key(5).public, index=64, encryption=True)
    offer = initiator.offer(COOKIE, BINDING)
    with pytest.raises(MalformedError, match="proof"):
        prove_offer(ANCHOR, offer, BINDING)


@pytest.mark.parametrize(
    "change",
    [
        {"expires": 0},  # an unregistration slipped into someone's REGISTER
        {"terminal_id": "laptop2"},
        {"vipa": "100.64.0.9"},
        {"cseq": 3},
        {"call_id": "other"},
    ],
)
def test_the_proof_covers_the_register_fields(change: dict[str, object]) -> None:
    _i, offer, _a = exchange()
    with pytest.raises(MalformedError, match="proof"):
        prove_offer(ANCHOR, offer, dataclasses.replace(BINDING, **change))  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["cookie", "ephemeral", "index", "encryption", "mac"])
def test_every_offer_field_is_covered(field: str) -> None:
    _i, offer, _a = exchange()
    value = getattr(offer, field)
    if isinstance(value, bool):
        changed: object = not value
    elif isinstance(value, int):
        changed = value + MAX_SLOTS
    else:
        changed = bytes([value[0] ^ 1]) + value[1:]
    altered = dataclasses.replace(offer, **{field: changed})  # type: ignore[arg-type]
    with pytest.raises(MalformedError):
        prove_offer(ANCHOR, altered, BINDING)


def test_forged_or_altered_acceptance_is_refused() -> None:
    initiator, _offer, acceptance = exchange()
    with pytest.raises(MalformedError, match="confirmation"):
        initiator.finish(acceptance, "100.64.0.3", 600)  # another VIPA than the anchor signed
    with pytest.raises(MalformedError, match="confirmation"):
        initiator.finish(dataclasses.replace(acceptance, index=192), "100.64.0.2", 600)
    stranger = StaticKey.generate().public
    with pytest.raises(MalformedError, match="confirmation"):
        initiator.finish(dataclasses.replace(acceptance, ephemeral=stranger), "100.64.0.2", 600)


def test_a_man_in_the_middle_without_the_anchor_key_cannot_confirm() -> None:
    # The terminal pinned ANCHOR; a middle box answers with its own key pair.
    initiator = Initiator(TERMINAL, ANCHOR.public, index=64, encryption=True)
    offer = initiator.offer(COOKIE, BINDING)
    mitm = key(6)
    with pytest.raises(MalformedError):
        prove_offer(mitm, offer, BINDING)  # cannot even check the proof
    ephemeral = StaticKey.generate()
    fake = Acceptance(ephemeral.public, 128, bytes(16))
    with pytest.raises(MalformedError):
        initiator.finish(fake, "100.64.0.2", 600)


def test_fresh_ephemerals_give_fresh_keys() -> None:
    runs = []
    for _ in range(2):
        initiator = Initiator(TERMINAL, ANCHOR.public, index=64, encryption=True)
        offer = initiator.offer(COOKIE, BINDING)
        _acceptance, keys = respond(
            prove_offer(ANCHOR, offer, BINDING), index=128, vipa="100.64.0.2", expires=600
        )
        runs.append(keys)
    assert runs[0].up != runs[1].up and runs[0].signing != runs[1].signing


def test_low_order_public_key_is_refused() -> None:
    with pytest.raises(MalformedError):
        ANCHOR.dh(bytes(32))  # the identity point: an all-zero shared secret


@pytest.mark.parametrize(
    "text",
    [
        "",
        "cookie=x",
        "cookie=AAAA;e=AAAA;s=AAAA;idx=64;enc=on;mac=AAAA",
        "e=" + "A" * 43 + ";idx=64;mac=" + "A" * 22 + ";e=" + "A" * 43,
        "e=" + "A" * 43 + ";idx=65;mac=" + "A" * 22,  # not a block base
        "e=" + "A" * 43 + ";idx=0;mac=" + "A" * 22,
        "e=" + "A" * 43 + ";idx=64;mac=" + "A" * 21 + "B",  # not canonical (low bits)
        "e=" + "A" * 43 + ";idx=64;mac=" + "A" * 22 + ";x=1",
        "e=" + "A" * 43 + ";idx=64;mac=" + "A" * 22 + ";" * 600,
    ],
)
def test_bad_header_values_are_malformed(text: str) -> None:
    with pytest.raises(MalformedError):
        Acceptance.parse_untrusted(text)
    with pytest.raises(MalformedError):
        Offer.parse_untrusted(text)


@given(st.text(max_size=300))
def test_random_text_raises_only_malformed(text: str) -> None:
    for parse in (Offer.parse_untrusted, Acceptance.parse_untrusted):
        with contextlib.suppress(MalformedError):
            parse(text)
    cookie = Offer.cookie_of_untrusted(text)
    assert cookie is None or len(cookie) == 20


def test_key_encoding_is_canonical() -> None:
    raw = bytes(range(32))
    assert decode_key_untrusted(encode_key(raw)) == raw
    with pytest.raises(MalformedError):
        decode_key_untrusted(encode_key(raw)[:-1] + "B")  # same bytes, other spelling
    with pytest.raises(MalformedError):
        decode_key_untrusted("A" * 44)


# --- cookies ------------------------------------------------------------------------


def test_cookie_is_bound_to_address_and_time() -> None:
    jar = CookieJar(lifetime=120)
    cookie = jar.issue(("192.0.2.2", 5070), 1000.0)
    assert jar.valid(cookie, ("192.0.2.2", 5070), 1100.0)
    assert not jar.valid(cookie, ("192.0.2.2", 5071), 1000.0)
    assert not jar.valid(cookie, ("192.0.2.3", 5070), 1000.0)
    assert not jar.valid(cookie, ("192.0.2.2", 5070), 1121.0)
    assert not CookieJar().valid(cookie, ("192.0.2.2", 5070), 1000.0)  # another secret
    assert not jar.valid(cookie[:-1] + bytes([cookie[-1] ^ 1]), ("192.0.2.2", 5070), 1000.0)
    assert not jar.valid(cookie[:10], ("192.0.2.2", 5070), 1000.0)


def test_a_forged_200_with_expires_0_is_refused_by_a_registering_terminal() -> None:
    from signalling.association import AssociationAttempt, Dialog
    from signalling.message import new_tag
    from signalling.register import build_register_ok

    attempt = AssociationAttempt(
        dialog=Dialog("c", "t"),
        static=TERMINAL,
        terminal_id="laptop1",
        an_host="198.51.100.2",
        an_port=5060,
        expires=600,
        vipa=None,
        index=64,
        encryption=True,
        pinned_anchor_key=ANCHOR.public,
    )
    request = attempt.register("192.0.2.2", 5070)
    forged = build_register_ok(request, vipa="100.64.0.2", expires=0, to_tag=new_tag())
    with pytest.raises(MalformedError, match="Expires 0"):
        attempt.on_ok(forged)
