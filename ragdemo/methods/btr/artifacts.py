"""What BTR keeps for a collection and how it is keyed, made and read: per chunk the binarized codes (or, merged
offline, indices into the collection's codebook), and per collection the calibration decoder, the codebook and the
distilled LoRA (with its recovery-trained decoder). `Btr` (method.py) mixes these in."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ...engine.binary import Codes, encode_many, from_blob, to_blob
from ...engine.calibration import Decoder, fit_decoder, identity_decoder
from ...engine.lora import adapter_key
from ...engine.memo import lm_memo
from ...engine.merging import merge_by_token
from ...engine.prefix import instruction_ids
from ...engine.prompt import passage_ids
from ...store import ArtifactRow, artifact_hash, chunk_key
from ...text import FUNCTION_WORDS
from ...units import fmt_bytes
from .forward import lower_states
from .training import KL, RECIPE, RECOVERY

FORMAT_VERSION = 3  # 3: fp16 decoder, content-keyed artifacts; bump when the artifact layout or the way states are computed changes

STOPWORDS = FUNCTION_WORDS  # ragdemo/text.py says why this list


def stopword_ids(tokenizer, token_ids: np.ndarray) -> set[int]:
    """Tokens that carry little passage-specific meaning: English stopwords and pure punctuation/space."""
    found = set()
    for token in np.unique(token_ids):
        text = tokenizer.decode([int(token)]).strip().lower()
        if text in STOPWORDS or not any(ch.isalnum() for ch in text):
            found.add(int(token))
    return found


def _parsed_decoder(blob: bytes) -> tuple[Decoder, bytes]:
    return Decoder.from_bytes(blob), blob


def _blob_digest(lm, blob: bytes | None) -> str | None:
    """artifact_hash of a decoder blob, remembered: several keys per answer name it. The memo is keyed by the
    bytes themselves, and Python keeps a bytes object's hash, so the decoder memo's own blob is looked up
    without hashing 1.3 MB again."""
    if not blob:
        return None
    return lm_memo(lm, "btr_decoder_digests", 8).get(blob, lambda: artifact_hash(blob))


DECODER_MEMORY = 64 << 20  # bytes of parsed decoders kept between answers (a few collections' worth)
STATE_MEMORY = 1_500_000_000  # bytes of float lower-layer states kept between prepares (a bits/calibration sweep
# then reruns no lower layer)


class BtrArtifacts:
    """BTR's store: artifact keys, the offline steps that make the artifacts, and the reads an answer does (the
    method's `name` is the store's method column)."""

    # ---------------------------------------------------------------------------------------------- keys
    def _base_hash(self, lm, params) -> dict:
        return {"v": FORMAT_VERSION, "split": params.split, "bits": params.bits, "calibrate": params.calibrate,
                "after_prefix": params.after_prefix, "prefix": artifact_hash(instruction_ids(lm)),
                "dtype": str(lm.dtype)}

    def _decoder_key(self, sig: str) -> str:
        return f"decoder:{sig}"

    def _chunk_hash(self, lm, params, decoder_blob: bytes | None) -> str:
        """Codes are keyed by the least-squares decoder they were encoded around, also with objective=recovery:
        its trained decoder keeps that decoder's centre (the only part codes depend on) and learns the weight
        alone, so the same codes (and the merged codebook built from them) serve both; the trained decoder is
        keyed with its adapter (`_adapter_hash`, objective included)."""
        return artifact_hash({**self._base_hash(lm, params), "decoder": _blob_digest(lm, decoder_blob)})

    @staticmethod
    def _codes_basis(params, sig: str) -> str | None:
        """Codes encoded around a calibration decoder depend on the whole collection (it was fitted on it);
        without calibration they depend on their own chunk only."""
        return sig if params.calibrate else None

    @staticmethod
    def _merged_hash(chunk_hash: str, params, sig: str) -> str:
        """Merged code indices point into the collection's codebook, so they depend on the whole collection."""
        return artifact_hash({"codes": chunk_hash, "r_o": params.r_o, "collection": sig})

    def _stored_hash(self, lm, params, decoder_blob, sig: str) -> str:
        """Params hash of what answers read: the chunk codes, or the merged indices when r_o > 0."""
        chunk_hash = self._chunk_hash(lm, params, decoder_blob)
        return self._merged_hash(chunk_hash, params, sig) if params.r_o > 0 else chunk_hash

    def _adapter_hash(self, lm, params, decoder_blob) -> str:
        # query_aware and objective join the key only away from query_aware=0 and objective=kl, whose keys name
        # neither; a recovery-trained decoder is stored under this hash too
        layout = {"query_aware": True} if params.query_aware else {}
        if params.objective != KL:
            layout["objective"] = params.objective
        return artifact_hash({"codes": self._chunk_hash(lm, params, decoder_blob), "k": params.k, "r": params.lora_r,
                              "steps": params.lora_steps, "lr": params.lora_lr, "recipe": RECIPE, **layout})

    @staticmethod
    def _state_key(lm, params, chunk) -> tuple:
        """The memo key of a chunk's float states: its content, never its row id."""
        prefix = instruction_ids(lm) if params.after_prefix else []
        return lm.model_id, str(lm.dtype), params.split, artifact_hash(prefix), artifact_hash(chunk["text"].encode())

    # ------------------------------------------------------------------------------------------- making
    def _fit(self, corpus, params, sig: str, states: list[np.ndarray], progress) -> ArtifactRow:
        """The collection's calibration decoder, fitted on every chunk's states (the previous content's decoder,
        codes and adapter were deleted when a document came or went)."""
        lm = corpus.lm
        started = time.perf_counter()
        progress(0.0, f"fitting the least-squares decoder on {sum(len(s) for s in states):,} tokens")
        blob = fit_decoder(states, params.bits).to_bytes()
        return ArtifactRow(self.name, lm.model_id, artifact_hash(self._base_hash(lm, params)), self._decoder_key(sig),
                           blob, collection_id=corpus.collection_id, basis=sig,
                           meta={"tokens": int(sum(len(s) for s in states)),
                                 "seconds": round(time.perf_counter() - started, 1)})

    def _code_rows(self, corpus, params, decoder, decoder_blob, sig: str, chunks: list[dict],
                   states: dict[str, np.ndarray]) -> list[ArtifactRow]:
        """Each chunk's codes around the decoder's centre, encoded in one vectorised call."""
        lm = corpus.lm
        chunk_hash = self._chunk_hash(lm, params, decoder_blob)
        basis = self._codes_basis(params, sig)
        all_codes = encode_many([states[chunk_key(c["text"])] for c in chunks], params.bits,
                                decoder.centre if params.calibrate else None)
        return [ArtifactRow(self.name, lm.model_id, chunk_hash, chunk_key(c["text"]), to_blob(codes),
                            chunk_id=c["chunk_id"], collection_id=corpus.collection_id if basis else None, basis=basis)
                for c, codes in zip(chunks, all_codes)]

    def _float_states(self, lm, params, chunk) -> np.ndarray:
        """A chunk's float layer-`split` states, kept in the LM's memo between prepares and fine-tunes."""
        prefix = instruction_ids(lm) if params.after_prefix else []
        memo = lm_memo(lm, "btr_lower_states", STATE_MEMORY, lambda value: value.nbytes)
        return memo.get(self._state_key(lm, params, chunk),
                        lambda: lower_states(lm, prefix, passage_ids(lm.tokenizer, chunk["text"]), params.split).cpu().numpy())

    def _compress(self, corpus, params, chunk_hash: str, chunks: list[dict], sig: str, say) -> None:
        """Paper Algorithm 1: one codebook of merged 1-bit codes for the collection, plus per chunk the index of
        each token's code. Stopwords (and punctuation) collapse to one code per vocabulary token."""
        lm, store = corpus.lm, corpus.store
        merged_hash = self._merged_hash(chunk_hash, params, sig)
        key = f"codebook:{sig}"
        if store.artifact_keys(self.name, lm.model_id, merged_hash, [key]):
            return  # written last, so its presence means every index is there too
        say(0.95, f"offline merging at r_o={params.r_o}")
        keys = [chunk_key(c["text"]) for c in chunks]
        blobs = store.get_artifacts(self.name, lm.model_id, chunk_hash, keys)
        all_codes = [from_blob(blobs[k]) for k in keys]
        token_ids = np.concatenate([passage_ids(lm.tokenizer, c["text"]) for c in chunks])
        packed = np.concatenate([c.planes[0] for c in all_codes])
        scales = np.concatenate([c.scales for c in all_codes])
        book = merge_by_token(token_ids, packed, scales, params.r_o, stopword_ids(lm.tokenizer, token_ids),
                              packed.shape[1] * 8)
        before = sum(len(b) for b in blobs.values())
        after = len(book.codes) * (book.codes.shape[1] + 2) + 4 * len(token_ids)
        say(0.97, f"offline merging: {len(token_ids)} codes -> {len(book.codes)} unique, ~{fmt_bytes(before)} -> ~{fmt_bytes(after)}")
        start = 0
        for chunk, codes in zip(chunks, all_codes):
            index = book.index[start:start + codes.n].astype("<u4")
            start += codes.n
            store.put_artifact(self.name, lm.model_id, merged_hash, chunk_key(chunk["text"]), index.tobytes(),
                               chunk_id=chunk["chunk_id"], collection_id=corpus.collection_id, basis=sig)
        store.put_artifact(self.name, lm.model_id, merged_hash, key,
                           st_save({"codes": book.codes, "scales": book.scales}), collection_id=corpus.collection_id,
                           basis=sig, meta={"before_bytes": int(before), "tokens": int(len(token_ids)),
                                            "codes_after": int(len(book.codes))})

    # ------------------------------------------------------------------------------------------ reading
    def _load_decoder(self, corpus, params, sig: str) -> tuple[Decoder | None, bytes | None]:
        """The decoder fitted on the collection's current content (`sig`); (None, None) when not fitted yet.
        Read and parsed once per stored version (the LM's memo, keyed by the artifact's identity, so a refit
        under the same key is read again): every answer needs it, and it is 1.3 MB at d=576."""
        lm = corpus.lm
        if not params.calibrate:
            return identity_decoder(lm.model.config.hidden_size), None
        ref = corpus.store.artifact_ref(self.name, lm.model_id, artifact_hash(self._base_hash(lm, params)),
                                        self._decoder_key(sig))
        if ref is None:
            return None, None
        memo = lm_memo(lm, "btr_decoders", DECODER_MEMORY, lambda loaded: 3 * len(loaded[1]))
        return memo.get(ref.identity, lambda: _parsed_decoder(ref.read()))

    def _artifacts(self, corpus, params, hits, loaded: tuple | None = None, sig: str | None = None) -> "_Read":
        """What answers over `hits` read; codes are missing where not prepared. `loaded`: a (decoder, blob) pair
        already read by the caller; `sig`: the collection's content signature, when the caller has it."""
        lm = corpus.lm
        sig = sig or corpus.store.content_signature(corpus.collection_id)
        decoder, decoder_blob = loaded or self._load_decoder(corpus, params, sig)
        if decoder is None:
            return _Read(None, None, {}, 0, 0, sig)
        blobs = corpus.store.get_artifacts(self.name, lm.model_id, self._stored_hash(lm, params, decoder_blob, sig),
                                           list({chunk_key(h["text"]) for h in hits}))
        nbytes = sum(len(b) for b in blobs.values())
        if params.r_o <= 0:
            return _Read(decoder, decoder_blob, {k: from_blob(b) for k, b in blobs.items()}, nbytes, 0, sig)
        book_blob = self._codebook_blob(corpus, params, decoder_blob, sig)
        if book_blob is None:
            return _Read(decoder, decoder_blob, {}, 0, 0, sig)
        book = st_load(book_blob)
        d = lm.model.config.hidden_size
        codes = {}
        for key, blob in blobs.items():
            index = np.frombuffer(blob, "<u4")
            codes[key] = Codes(len(index), d, 1, planes=book["codes"][index][None], scales=book["scales"][index])
        return _Read(decoder, decoder_blob, codes, nbytes, len(book_blob), sig)

    def _codebook_blob(self, corpus, params, decoder_blob, sig: str) -> bytes | None:
        if params.r_o <= 0:
            return None
        return corpus.store.get_artifact(self.name, corpus.lm.model_id, self._stored_hash(corpus.lm, params, decoder_blob, sig),
                                         f"codebook:{sig}")

    def _trained_decoder_blob(self, corpus, params, decoder_blob: bytes | None, sig: str) -> bytes | None:
        """objective=recovery: the decoder trained jointly with the collection's adapter, stored beside it and
        used exactly when that adapter is (lora on and trained); otherwise None."""
        if RECOVERY not in params.objective or not params.lora or not params.calibrate:
            return None
        lm, store = corpus.lm, corpus.store
        where = self._adapter_hash(lm, params, decoder_blob)
        if not store.artifact_keys(self.name, lm.model_id, where, [adapter_key(sig)]):
            return None  # a fine-tune stopped between the two writes: the decoder alone is never used
        return store.get_artifact(self.name, lm.model_id, where, self._decoder_key(sig))

    def _trained_decoder(self, corpus, params, read: "_Read") -> Decoder | None:
        blob = self._trained_decoder_blob(corpus, params, read.decoder_blob, read.sig)
        read.trained_bytes = len(blob or b"")
        return Decoder.from_bytes(blob) if blob is not None else None

    def _adapter(self, corpus, params, decoder_blob, sig: str):
        """The LoRA distilled on the collection's current content for these knobs, when trained and wanted, as a
        stored reference (read only the first time it is switched on)."""
        if not params.lora:
            return None
        return corpus.store.artifact_ref(self.name, corpus.lm.model_id, self._adapter_hash(corpus.lm, params, decoder_blob),
                                         adapter_key(sig))


@dataclass
class _Read:
    """Stored artifacts read for some chunks: the decoder, {chunk_key: Codes}, and bytes read."""

    decoder: Decoder | None
    decoder_blob: bytes | None
    codes: dict
    chunk_bytes: int
    codebook_bytes: int
    sig: str
    trained_bytes: int = 0  # the recovery-trained decoder read besides the least-squares one
