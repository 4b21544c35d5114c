"""Real client SDKs against a running keygate: each refusal must raise the SDK's own exception
class, and admitted calls must work unchanged. Driven by tests/sdk.rs; exits non-zero on any
mismatch and prints one line per case."""

import os
import sys

import anthropic
import openai

BASE = os.environ["KG_BASE"]
OK, MINI_ONLY, UNKNOWN = os.environ["KG_OK"], os.environ["KG_MINI_ONLY"], "sk-unknown-key"
EXHAUSTED = os.environ["KG_EXHAUSTED"]
failures = []


def expect(name, exc_class, fn):
    try:
        fn()
    except exc_class as e:
        print(f"ok   {name}: {type(e).__name__} {getattr(e, 'status_code', '')}")
        return
    except Exception as e:  # noqa: BLE001 - report the wrong class
        failures.append(f"{name}: expected {exc_class.__name__}, got {type(e).__name__}: {e}")
        print(f"FAIL {failures[-1]}")
        return
    failures.append(f"{name}: expected {exc_class.__name__}, got no exception")
    print(f"FAIL {failures[-1]}")


def oa(key):
    return openai.OpenAI(base_url=BASE + "/v1", api_key=key, max_retries=0)


def an(key):
    return anthropic.Anthropic(base_url=BASE, api_key=key, max_retries=0)


msgs = [{"role": "user", "content": "Hello"}]

# Admitted calls work through the SDKs unchanged.
r = oa(OK).chat.completions.create(model="gpt-4o-mini", messages=msgs)
assert r.usage.total_tokens > 0, r
chunks = list(oa(OK).chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True))
assert chunks, "no stream chunks"
m = an(OK).messages.create(model="claude-3-5-sonnet-latest", max_tokens=32, messages=msgs)
assert m.usage.output_tokens > 0, m
print("ok   admitted calls through openai and anthropic SDKs")

expect("openai unknown key", openai.AuthenticationError,
       lambda: oa(UNKNOWN).chat.completions.create(model="gpt-4o-mini", messages=msgs))
expect("openai model not allowed", openai.PermissionDeniedError,
       lambda: oa(MINI_ONLY).chat.completions.create(model="gpt-4o", messages=msgs))
expect("openai model required", openai.BadRequestError,
       lambda: oa(OK).chat.completions.create(model="", messages=msgs))
expect("openai model not found", openai.NotFoundError,
       lambda: oa(OK).chat.completions.create(model="llama-3-70b", messages=msgs))
expect("openai quota exhausted", openai.RateLimitError,
       lambda: oa(EXHAUSTED).chat.completions.create(model="gpt-4o-mini", messages=msgs))
expect("anthropic quota exhausted", anthropic.RateLimitError,
       lambda: an(EXHAUSTED).messages.create(model="claude-3-5-sonnet-latest", max_tokens=8, messages=msgs))
expect("anthropic unknown key", anthropic.AuthenticationError,
       lambda: an(UNKNOWN).messages.create(model="claude-3-5-sonnet-latest", max_tokens=8, messages=msgs))
expect("anthropic model not allowed", anthropic.PermissionDeniedError,
       lambda: an(MINI_ONLY).messages.create(model="claude-3-5-sonnet-latest", max_tokens=8, messages=msgs))

# SPEC §7: rate limits, budgets and accounts.
RPM_OA, RPM_AN = os.environ["KG_RPM_OA"], os.environ["KG_RPM_AN"]
BUDGET, ACCOUNT_OFF = os.environ["KG_BUDGET"], os.environ["KG_ACCOUNT_OFF"]
oa(RPM_OA).chat.completions.create(model="gpt-4o-mini", messages=msgs)
an(RPM_AN).messages.create(model="claude-3-5-sonnet-latest", max_tokens=8, messages=msgs)
expect("openai rpm reached", openai.RateLimitError,
       lambda: oa(RPM_OA).chat.completions.create(model="gpt-4o-mini", messages=msgs))
expect("anthropic rpm reached", anthropic.RateLimitError,
       lambda: an(RPM_AN).messages.create(model="claude-3-5-sonnet-latest", max_tokens=8, messages=msgs))
expect("openai budget spent", openai.RateLimitError,
       lambda: oa(BUDGET).chat.completions.create(model="gpt-4o-mini", messages=msgs))
expect("anthropic budget spent", anthropic.RateLimitError,
       lambda: an(BUDGET).messages.create(model="claude-3-5-sonnet-latest", max_tokens=8, messages=msgs))
expect("openai account disabled", openai.AuthenticationError,
       lambda: oa(ACCOUNT_OFF).chat.completions.create(model="gpt-4o-mini", messages=msgs))
expect("anthropic account disabled", anthropic.AuthenticationError,
       lambda: an(ACCOUNT_OFF).messages.create(model="claude-3-5-sonnet-latest", max_tokens=8, messages=msgs))

if failures:
    sys.exit(1)
print("15 passed, 0 failed")
