#!/usr/bin/env node
// Committed shim: runs the built daemon from dist/ (run `pnpm build` first; the README's commands do).
import { main } from "../dist/main.js";

process.exitCode = await main(process.argv.slice(2));
