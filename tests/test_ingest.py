import pytest

from ragdemo.errors import UserError
from ragdemo.ingest import chunk_text, read_document, safe_name

from .fixtures import minimal_docx, minimal_pdf


def test_txt_and_md():
    assert read_document("a.txt", b"Hello there.\r\nSecond line.") == "Hello there.\nSecond line."
    assert "Heading" in read_document("a.md", "# Heading\n\nBody with caf\u00e9".encode())


def test_non_utf8_text_is_detected():
    text = "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e \u00e0 la fran\u00e7aise, tr\u00e8s r\u00e9ussie. " * 5
    assert read_document("latin1.txt", text.encode("latin-1")).startswith("Caf\u00e9 cr\u00e8me")


def test_html_drops_scripts_and_tags():
    html = b"<html><head><title>t</title><script>alert(1)</script></head><body><h1>Title</h1><p>Para &amp; text</p></body></html>"
    text = read_document("page.html", html)
    assert "Title" in text and "Para & text" in text
    assert "alert" not in text and "<p>" not in text


def test_pdf():
    assert "Hello PDF world" in read_document("doc.pdf", minimal_pdf("Hello PDF world"))


def test_docx():
    text = read_document("doc.docx", minimal_docx(["First paragraph.", "Second paragraph."]))
    assert "First paragraph." in text and "Second paragraph." in text


@pytest.mark.parametrize("name,data,message", [
    ("empty.txt", b"", "empty"),
    ("garbage.txt", bytes(range(256)) * 40, "binary"),
    ("broken.pdf", minimal_pdf("x")[:60], "PDF"),
    ("broken.docx", b"PK\x03\x04 not really a zip", "docx"),
    ("image.png", b"\x89PNG....", "unsupported"),
])
def test_bad_files_give_clear_errors(name, data, message):
    with pytest.raises(UserError, match=message):
        read_document(name, data)


def test_safe_name_strips_paths_and_control_characters():
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("a\x00b\x07c.txt") == "abc.txt"
    assert safe_name("..\\..\\win.txt") == "win.txt"
    assert safe_name("\x00") == "unnamed"


def test_chunks_are_64_tokens_and_tile_the_text(tiny_lm):
    text = "The quick brown fox jumps over the lazy dog. " * 40
    chunks = chunk_text(text, tiny_lm.tokenizer, 64)
    assert all(c.tok_end - c.tok_start == 64 for c in chunks[:-1])
    assert 0 < chunks[-1].tok_end - chunks[-1].tok_start <= 64
    assert "".join(c.text for c in chunks) == text
    assert all(text[c.char_start:c.char_end] == c.text for c in chunks)
    assert len(chunk_text(text, tiny_lm.tokenizer, 16)) > len(chunks)
