/** The HTTP API: quickim's envelope, the token, one renewal on 401. */
import { QuickimError } from './errors';
import type { TokenKeeper } from './token';

export class Api {
  constructor(
    readonly baseUrl: string,
    private readonly tokens: TokenKeeper,
    private readonly fetchFn: typeof fetch,
  ) {}

  /** POSTs `body` to `path`; answers `data`, or throws a QuickimError. */
  async post<T>(path: string, body: unknown, signal?: AbortSignal): Promise<T> {
    let token = await this.tokens.current();
    for (let attempt = 0; ; attempt++) {
      const res = await this.request(path, body, token, signal);
      if (res.status === 401 && attempt === 0) {
        token = await this.tokens.renew();
        continue;
      }
      return unwrap<T>(res);
    }
  }

  private async request(path: string, body: unknown, token: string, signal?: AbortSignal): Promise<Response> {
    try {
      return await this.fetchFn(this.baseUrl + path, {
        method: 'POST',
        headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
        body: JSON.stringify(body ?? {}),
        signal,
      });
    } catch (e) {
      if (signal?.aborted) throw e;
      throw new QuickimError(0, 0, `network error: ${e instanceof Error ? e.message : String(e)}`);
    }
  }
}

/** Reads quickim's envelope `{code, data}` / `{code, error}`. */
export async function unwrap<T>(res: Response): Promise<T> {
  let body: { code?: number; data?: T; error?: string } | null = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  if (res.ok && body && body.code === 0) return body.data as T;
  throw new QuickimError(res.status, body?.code ?? 0, body?.error ?? `HTTP ${res.status}`);
}
