"""A desktop chat app over edgelm: PySide6, no server in between.

    pip install "edgelm[llamacpp,desktop]"    # PySide6 and PyInstaller
    python app.py                     # the embedded default model (SmolLM2-135M-Instruct)
    python app.py --model model.gguf  # or any GGUF file / ONNX folder
    python app.py --self-test         # load the model, stream 8 tokens, print them, exit 0
    pyinstaller app.py                # freeze it (edgelm's PyInstaller hooks collect what it needs)

The pattern to copy: the window never waits on the model.  Loading and generating run in worker threads; they talk
to the window only through Qt signals (queued into the UI thread).  Stop calls ``ChunkStream.cancel()``, which may
be called from any thread: the stream ends after the token being computed, with finish_reason "cancelled".
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

import edgelm
from edgelm.platforms import default_threads
from edgelm.store import list_models
from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import (QApplication, QComboBox, QDoubleSpinBox, QFileDialog, QHBoxLayout, QLabel,
                               QLineEdit, QMainWindow, QPlainTextEdit, QProgressBar, QPushButton,
                               QSpinBox, QVBoxLayout, QWidget)

DEFAULT = "Default model (SmolLM2-135M-Instruct)"
# One core is left to the window: llama.cpp's threads wait for each other at every step of a token, so one of them
# put aside for the UI thread stalls them all (measured on 2 cores: 210 ms a token with 2 threads, 12 ms with 1).
THREADS = max(1, default_threads() - 1)


def bundled_model() -> str | None:
    """A model frozen into the app next to the program (``models/``), if any; else edgelm.load's default."""
    base = Path(getattr(sys, "_MEIPASS", Path(__file__).resolve().parent))
    found = sorted((base / "models").glob("*.gguf")) if (base / "models").is_dir() else []
    return str(found[0]) if found else None


class Signals(QObject):
    """What the worker threads tell the window.  Emitted from any thread, delivered in the UI thread."""

    progress = Signal(float)  # 0.0 .. 1.0 while a model loads
    loaded = Signal(object)  # the edgelm.Model
    token = Signal(str)  # a piece of the answer
    done = Signal(str)  # finish reason: stop, length, cancelled
    error = Signal(str)  # a message for the user (edgelm's errors say how to fix the problem)


class ChatWindow(QMainWindow):
    def __init__(self, model: str | None = None) -> None:
        super().__init__()
        self.setWindowTitle("edgelm chat")
        self.resize(720, 560)
        self.model: edgelm.Model | None = None
        self.stream: edgelm.model.ChunkStream | None = None
        self.messages: list[dict[str, str]] = []
        self.reply: str | None = None  # the answer streaming in; None: nothing to show (a new chat began)
        self.signals = Signals()
        self.signals.progress.connect(lambda f: self.progress.setValue(int(f * 100)))
        self.signals.loaded.connect(self.on_loaded)
        self.signals.token.connect(self.on_token)
        self.signals.done.connect(self.on_done)
        self.signals.error.connect(self.on_error)

        self.picker = QComboBox()
        self.picker.addItem(DEFAULT, model or bundled_model())
        for stored in list_models():  # models in edgelm's store: the Hugging Face cache and converted outputs
            self.picker.addItem(f"{stored.name} ({stored.format})", stored.path)
        if model:
            self.picker.setItemText(0, Path(model).name)
        self.picker.activated.connect(lambda i: self.load(self.picker.itemData(i)))
        open_button = QPushButton("Open…")
        open_button.clicked.connect(self.open_file)
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=2.0, singleStep=0.1, value=0.7)
        self.max_tokens = QSpinBox(minimum=1, maximum=8192, value=256)
        self.new_chat_button = QPushButton("New chat")
        self.new_chat_button.clicked.connect(self.new_chat)
        top = QHBoxLayout()
        for widget in (self.picker, open_button, QLabel("Temperature"), self.temperature, QLabel("Max tokens"),
                       self.max_tokens, self.new_chat_button):
            top.addWidget(widget)
        top.setStretch(0, 1)

        self.progress = QProgressBar(maximum=100)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.transcript = QPlainTextEdit(readOnly=True)
        self.prompt = QLineEdit(placeholderText="Ask something…")
        self.prompt.returnPressed.connect(self.send)
        self.send_button = QPushButton("Send")
        self.send_button.clicked.connect(self.send)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop)
        bottom = QHBoxLayout()
        for widget in (self.prompt, self.send_button, self.stop_button):
            bottom.addWidget(widget)

        layout = QVBoxLayout()
        for part in (top, self.progress, self.status, self.transcript, bottom):
            (layout.addLayout if isinstance(part, QHBoxLayout) else layout.addWidget)(part)
        central = QWidget()
        central.setLayout(layout)
        self.setCentralWidget(central)
        self.set_busy(False)

    # --- the model, loaded in a worker thread ---------------------------------------------------------------

    def open_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a model", str(Path.home()), "GGUF models (*.gguf)")
        if path:
            self.picker.addItem(Path(path).name, path)
            self.picker.setCurrentIndex(self.picker.count() - 1)
            self.load(path)

    def load(self, path: str | None) -> None:
        """Load ``path`` (None: the default model) while the window stays responsive."""
        self.stop()
        old, self.model = self.model, None
        self.set_busy(True, loading=True)
        self.status.setText(f"Loading {Path(path).name if path else 'the default model'}…")

        def work() -> None:
            if old is not None:
                old.close()  # its memory goes back to the system before the next one loads
            try:
                self.signals.loaded.emit(edgelm.load(path, threads=THREADS, progress=self.signals.progress.emit))
            except Exception as exc:  # noqa: BLE001 - shown in the window
                self.signals.error.emit(f"Could not load the model: {exc}")

        threading.Thread(target=work, name="load-model", daemon=True).start()

    def on_loaded(self, model: edgelm.Model) -> None:
        self.model = model
        self.status.setText(f"{model.info.name or Path(model.info.path).name} — {model.info.quantization}, "
                            f"{model.info.backend}, context {model.n_ctx} tokens")
        self.set_busy(False)

    # --- chatting: the answer streams in from a worker thread -----------------------------------------------

    def send(self) -> None:
        text = self.prompt.text().strip()
        if not text or self.stream is not None:
            return
        if self.model is None:
            self.on_error("No model is loaded yet.")
            return
        self.messages.append({"role": "user", "content": text})
        try:  # errors a user can fix (no chat template, context full) come here, before any token
            stream = self.model.stream_chat(self.messages, temperature=self.temperature.value(),
                                            max_tokens=self.max_tokens.value())
        except edgelm.EdgelmError as exc:
            self.messages.pop()
            self.on_error(str(exc))
            return
        self.prompt.clear()
        self.append(f"You: {text}\n\nAssistant: ")
        self.stream, self.reply = stream, ""
        self.set_busy(True)
        threading.Thread(target=self.generate, args=(stream,), name="generate", daemon=True).start()

    def generate(self, stream: edgelm.model.ChunkStream) -> None:
        """In a worker thread: forward each piece of text, then the finish reason."""
        try:
            finish = "stop"
            for chunk in stream:
                if chunk.text:
                    self.signals.token.emit(chunk.text)
                finish = chunk.finish_reason or finish
            self.signals.done.emit(finish)
        except Exception as exc:  # noqa: BLE001 - shown in the window
            self.signals.error.emit(str(exc))
            self.signals.done.emit("error")

    def on_token(self, text: str) -> None:
        if self.reply is not None:
            self.reply += text
            self.append(text)

    def on_done(self, finish: str) -> None:
        if self.reply:
            self.messages.append({"role": "assistant", "content": self.reply})
        elif self.reply is not None and self.messages:
            self.messages.pop()  # no answer: the next prompt is not sent after an unanswered one
        if self.reply is not None:
            note = {"cancelled": " [stopped]", "length": " [max tokens reached]"}.get(finish, "")
            self.append(f"{note}\n\n")
        self.stream, self.reply = None, None
        self.set_busy(False)

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.cancel()  # from the UI thread; the worker's loop ends after the current token

    def new_chat(self) -> None:
        self.stop()  # a running answer is dropped: its last tokens arrive after this and are not shown
        self.reply = None
        self.messages.clear()
        self.transcript.clear()
        self.status.setText("New chat.")

    # --- the window -----------------------------------------------------------------------------------------

    def append(self, text: str) -> None:
        cursor = self.transcript.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.insertText(text)
        self.transcript.setTextCursor(cursor)
        self.transcript.ensureCursorVisible()

    def on_error(self, message: str) -> None:
        self.status.setText(f"<span style='color:#b00020'>{message}</span>")
        if self.progress.isVisible():  # a failed load: nothing is loaded now
            self.set_busy(False)

    def set_busy(self, busy: bool, *, loading: bool = False) -> None:
        self.progress.setVisible(loading)
        if loading:
            self.progress.setValue(0)
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy and not loading)
        self.picker.setEnabled(not busy)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        self.stop()
        if self.model is not None:
            self.model.close()
        super().closeEvent(event)


def self_test(model: str | None) -> int:
    """Load the model, stream 8 tokens and print them: a frozen build's smoke test (no display needed)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    app = QApplication.instance() or QApplication(sys.argv[:1])
    ChatWindow(model)  # the window builds (Qt's libraries and plugins were found)
    with edgelm.load(model or bundled_model(), threads=THREADS) as m:
        print(f"model: {m.info.name} ({m.info.backend})", flush=True)
        pieces = []
        for chunk in m.stream_chat([{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0):
            pieces.extend(m.detokenize([t]) for t in chunk.tokens)
            print(chunk.text, end="", flush=True)
        print(f"\nself-test ok: {len(pieces)} tokens: {pieces}", flush=True)
    app.quit()
    return 0 if len(pieces) == 8 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a .gguf file or ONNX folder (default: the embedded default model)")
    parser.add_argument("--self-test", action="store_true", help="stream 8 tokens without a window, then exit")
    args = parser.parse_args()
    if args.self_test:
        return self_test(args.model)
    app = QApplication(sys.argv)
    window = ChatWindow(args.model)
    window.show()
    window.load(window.picker.itemData(0))  # the window is up first; the model arrives in the background
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
