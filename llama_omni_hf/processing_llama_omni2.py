"""Processor of LLaMA-Omni2: audio -> Whisper log-mel features, conversation -> Qwen2.5 prompt ids.

The original's input pipeline (spec llama-omni2 §2.1): mono 16 kHz float audio padded or cut to 30 s, 128-bin
log-mel, the checkpoint's own (Qwen2.5) chat template with user turns whose content is the string "<speech>",
the rendered text tokenized as it is (Qwen adds no BOS), and every `<speech>` expanded to the 300 placeholder
ids the model overwrites with adaptor outputs. Audio handling, padding and batching are LLaMA-Omni's.
"""

from __future__ import annotations

from .processing_llama_omni import LlamaOmniProcessor


class LlamaOmni2Processor(LlamaOmniProcessor):
    r"""Whisper feature extractor (128 mels, 30 s) + Qwen2.5 tokenizer with `<speech>`.

    As `LlamaOmniProcessor`, except:

    - the chat template is the checkpoint's own (`chat_template=`, else the tokenizer's), never LLaMA-Omni's;
    - a message whose content is a list of items is given to the template as a string: each `{"type": "audio"}`
      item becomes `<speech>`, each `{"type": "text", "text": ...}` item its text, joined with "\n" (the stock
      Qwen2.5 template renders `message.content` as a string; the original's user turn is exactly "<speech>");
    - the rendered text is tokenized without added special tokens (no double BOS: Qwen adds none).
    """

    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        chat_template=None,
        speech_token="<speech>",
        speech_tokens_per_audio=300,
        double_bos=False,
        **kwargs,
    ):
        chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not chat_template:
            raise ValueError(
                "LlamaOmni2Processor needs the checkpoint's chat template: pass `chat_template=` or a tokenizer "
                "that has one (LLaMA-Omni's Llama-3 template is never used for LLaMA-Omni2)"
            )
        super().__init__(
            feature_extractor,
            tokenizer,
            chat_template=chat_template,
            speech_token=speech_token,
            speech_tokens_per_audio=speech_tokens_per_audio,
            double_bos=double_bos,
            **kwargs,
        )

    def _template_messages(self, messages: list[dict]) -> list[dict]:
        """Item-list contents as strings: audio items -> `<speech>`, text items -> their text, joined with "\n"."""
        result = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, list):
                parts = []
                for item in content:
                    kind = item.get("type") if isinstance(item, dict) else None
                    if kind == "audio":
                        parts.append(self.speech_token)
                    elif kind == "text":
                        parts.append(item.get("text", ""))
                    else:
                        raise ValueError(
                            f"{kind!r} items are not supported: LLaMA-Omni2 takes audio and text items only"
                        )
                message = {**message, "content": "\n".join(parts)}
            result.append(message)
        return result


__all__ = ["LlamaOmni2Processor"]
