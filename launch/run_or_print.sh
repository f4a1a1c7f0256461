# Sourced by the launch scripts (not run on its own): the shared --dry-run printer.
# shellcheck shell=bash

# Prints a command as a shell would read it back; runs it unless dry_run=1.
run() {
    local out="" a
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
    done
    echo "+ ${out% }"
    if [[ ${dry_run:-0} -eq 0 ]]; then "$@"; fi
}
