#!/usr/bin/env node
// Runs bin/blkd.cjs, the package's `blkd` (kept for scripts that start blkd by this path).
import "./blkd.cjs";
