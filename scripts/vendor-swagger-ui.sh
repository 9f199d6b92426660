#!/usr/bin/env bash
# Vendor Swagger UI (swagger-ui-dist, Apache-2.0) from the npm registry into
# api/static/docs, where /docs serves it: the API docs need nothing at run time
# but the package. Update: run with a newer version, check /docs, commit.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-5.35.0}
dest=api/static/docs/vendor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "swagger-ui-dist@$version" >/dev/null && tar xzf swagger-ui-dist-*.tgz)
rm -rf "$dest"
mkdir -p "$dest"
for file in swagger-ui-bundle.js swagger-ui.css LICENSE NOTICE package.json; do
  cp "$work/package/$file" "$dest/"
done
echo "swagger-ui-dist $version -> $dest"
