// The public API, as the page calls it: the key from the tab's session storage, errors as
// ApiError with the contract's code and message.

const KEY = "posegen.apiKey";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function savedKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function saveKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export async function call(path, { method = "GET", body, headers = {} } = {}) {
  let response;
  try {
    response = await fetch(path, {
      method,
      body,
      headers: { ...headers, Authorization: `Bearer ${savedKey()}` },
    });
  } catch (err) {
    throw new ApiError(0, "network", `The API could not be reached (${err.message}).`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function json(path, options) {
  return (await call(path, options)).json();
}

// An image the API serves behind the key, as a URL an <img> can show.
export async function imageUrl(path) {
  const blob = await (await call(path)).blob();
  return URL.createObjectURL(blob);
}

async function errorOf(response) {
  try {
    const { error } = await response.json();
    return new ApiError(response.status, error.code, error.message);
  } catch {
    const text = `HTTP ${response.status} ${response.statusText}`.trim();
    return new ApiError(response.status, `http_${response.status}`, text);
  }
}
