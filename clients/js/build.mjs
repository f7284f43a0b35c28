// Builds dist/: the ES module (quickim.js + map), its type declarations (dist/types) and the
// demo page served by the gateway at /demo (dist/demo: the page and a copy of the module).
import { build } from 'esbuild';
import { execFileSync } from 'node:child_process';
import { cpSync, mkdirSync, rmSync } from 'node:fs';

rmSync('dist', { recursive: true, force: true });
await build({
  entryPoints: ['src/index.ts'],
  bundle: true,
  format: 'esm',
  target: ['es2020'],
  sourcemap: true,
  outfile: 'dist/quickim.js',
  logLevel: 'warning',
});
execFileSync(process.execPath, ['node_modules/typescript/bin/tsc', '-p', 'tsconfig.json'], { stdio: 'inherit' });
mkdirSync('dist/demo', { recursive: true });
cpSync('demo', 'dist/demo', { recursive: true });
cpSync('dist/quickim.js', 'dist/demo/quickim.js');
console.log('built dist/quickim.js, dist/types, dist/demo');
