"""The converter's error type (import-free, so every conversion module can raise it)."""


class ConversionError(ValueError):
    """Input the converter cannot handle; one line naming the file and the field or tensor."""


def require(condition: bool, path: str, message: str) -> None:
    """Raise ConversionError('path: message') unless ``condition``."""
    if not condition:
        raise ConversionError(f"{path}: {message}")
