"""File readers: bytes in, plain text out, or a `UserError` that says what is wrong with the file."""
from __future__ import annotations

import io
import re
import unicodedata
from html.parser import HTMLParser
from pathlib import PurePath

from ..errors import UserError

SUPPORTED = {".txt", ".md", ".markdown", ".pdf", ".html", ".htm", ".docx"}


def safe_name(name: str) -> str:
    """A display name only: the base name, without control characters. Uploads are never written under it."""
    base = PurePath(str(name).replace("\\", "/")).name
    cleaned = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip().lstrip(".")
    return cleaned[:200] or "unnamed"


def read_document(name: str, data: bytes) -> str:
    suffix = PurePath(name).suffix.lower()
    if suffix not in SUPPORTED:
        raise UserError(f"{safe_name(name)}: unsupported file type '{suffix or 'none'}' (supported: {', '.join(sorted(SUPPORTED))})")
    if not data:
        raise UserError(f"{safe_name(name)}: the file is empty")
    reader = {".pdf": read_pdf, ".docx": read_docx, ".html": read_html, ".htm": read_html}.get(suffix, read_text)
    text = normalise(reader(name, data))
    if not text.strip():
        raise UserError(f"{safe_name(name)}: no text could be extracted")
    return text


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def decode_text(name: str, data: bytes) -> str:
    """UTF-8 first; otherwise detect the encoding; binary data is refused rather than stored as noise."""
    if data.count(b"\x00") > max(1, len(data) // 1000):
        raise UserError(f"{safe_name(name)}: this looks like a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        raise UserError(f"{safe_name(name)}: could not detect the text encoding; save it as UTF-8")
    text = str(best)
    controls = sum(1 for ch in text if unicodedata.category(ch) == "Cc" and ch not in "\n\t\r")
    if controls > len(text) * 0.01:
        raise UserError(f"{safe_name(name)}: this looks like a binary file, not text")
    return text


def read_text(name: str, data: bytes) -> str:
    return decode_text(name, data)


def read_pdf(name: str, data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            raise UserError(f"{safe_name(name)}: the PDF is encrypted")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except UserError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as exc:
        raise UserError(f"{safe_name(name)}: corrupt or unreadable PDF ({type(exc).__name__})") from exc


def read_docx(name: str, data: bytes) -> str:
    import zipfile

    from docx import Document

    try:
        document = Document(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise UserError(f"{safe_name(name)}: corrupt or unreadable .docx ({type(exc).__name__})") from exc
    parts = [p.text for p in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            parts.append(" | ".join(cell.text for cell in row.cells))
    return "\n\n".join(parts)


class _TextExtractor(HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "head"}
    BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section", "article", "pre", "blockquote"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def read_html(name: str, data: bytes) -> str:
    parser = _TextExtractor()
    parser.feed(decode_text(name, data))
    parser.close()
    text = "".join(parser.parts)
    return re.sub(r"[ \t]+", " ", text)
