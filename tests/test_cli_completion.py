"""`clusterconnect completion bash|zsh`: the real console script prints a script that bash (and zsh, when
installed) can source, and that completes commands, flags and flag values."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from chain import script


def _bash(tmp_path, body: str) -> str:
    completion = tmp_path / "completion.bash"
    completion.write_text(subprocess.run([script("clusterconnect"), "completion", "bash"], capture_output=True,
                                         text=True, check=True, timeout=30).stdout)
    return subprocess.run(["bash", "--norc", "--noprofile", "-c", f"source {completion}\n{body}"],
                          capture_output=True, text=True, check=True, timeout=30).stdout


def test_bash_sources_the_script_and_registers_the_function():
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c",
                             f"source <({script('clusterconnect')} completion bash); complete -p clusterconnect"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout == "complete -F _clusterconnect clusterconnect\n"


@pytest.mark.parametrize(("words", "offered"), [
    (["clu"], ["clusters"]),
    (["clusters", ""], ["add", "list", "show", "remove", "grant", "revoke", "access"]),
    (["clusters", "list", "-o", ""], ["table", "json", "yaml"]),
    (["clusters", "show", "--relay", "https://r:8443", "--out"], ["--output"]),
    (["completion", ""], ["bash", "zsh"]),
    (["proxy", ""], ["stop"]),
    (["proxy", "dev", "--back"], ["--background"]),
    (["proxy", "stop", "--st"], ["--state-dir"]),
], ids=["command", "subcommand", "choices", "flag-after-a-value", "positional-choices", "proxy-stop",
        "proxy-flag", "proxy-stop-flag"])
def test_bash_completes_commands_flags_and_values(tmp_path, words, offered):
    words_text = " ".join(f"'{word}'" for word in ["clusterconnect", *words])
    out = _bash(tmp_path, f'COMP_WORDS=({words_text}); COMP_CWORD={len(words)}; _clusterconnect;'
                          ' printf "%s\\n" "${COMPREPLY[@]}"')
    assert out.split() == offered


def test_zsh_script():
    text = subprocess.run([script("clusterconnect"), "completion", "zsh"], capture_output=True, text=True,
                          check=True, timeout=30).stdout
    assert "bashcompinit" in text and "complete -F _clusterconnect clusterconnect" in text
    if shutil.which("zsh") is None:
        return  # the text only
    result = subprocess.run(["zsh", "-fc", "autoload -U compinit && compinit -u -D; source /dev/stdin;"
                             " print -r -- ${_comps[clusterconnect]}"], input=text, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "_bash_complete -F _clusterconnect", result.stderr
