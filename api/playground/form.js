// The submit's parameters as inputs, built from the API's own OpenAPI schema: every field
// the server takes, with its bounds, lengths and choices, and none it does not.

const OWN_INPUTS = new Set(["image", "pose_image", "pose_template_id", "model_key"]);
const LONG_TEXT = new Set(["prompt", "negative_prompt"]);

export async function submitForm() {
  const response = await fetch("/openapi.json");
  const schema = await response.json();
  const media = schema.paths["/v1/generations"].post.requestBody.content["multipart/form-data"];
  const name = media.schema.$ref.split("/").pop();
  return schema.components.schemas[name].properties;
}

export function buildParams(container, properties) {
  container.replaceChildren();
  for (const [name, prop] of Object.entries(properties)) {
    if (OWN_INPUTS.has(name) || prop.format === "binary") continue;
    container.append(field(name, prop));
  }
}

// The model's own defaults, shown where the caller leaves a field empty.
export function showModelDefaults(container, model) {
  const defaults = {
    prompt: model.default_prompt,
    negative_prompt: model.negative_prompt,
    num_inference_steps: model.default_steps,
    guidance_scale: model.guidance_scale,
  };
  for (const [name, value] of Object.entries(defaults)) {
    const input = container.querySelector(`[name="${name}"]`);
    if (input && value !== undefined && value !== null) input.placeholder = String(value);
  }
}

export function appendParams(container, form) {
  for (const input of container.querySelectorAll("[name]")) {
    if (input.type === "checkbox") {
      if (input.checked) form.append(input.name, "true");
    } else if (input.value.trim() !== "") {
      form.append(input.name, input.value.trim());
    }
  }
}

function field(name, prop) {
  const label = document.createElement("label");
  label.className = "field";
  const title = document.createElement("span");
  title.textContent = prop.title || name;
  const input = control(name, prop);
  input.name = name;
  input.id = `param-${name}`;
  const hint = document.createElement("small");
  hint.textContent = [prop.description, bounds(prop)].filter(Boolean).join(" ");
  label.append(title, input, hint);
  return label;
}

function control(name, prop) {
  if (prop.enum) {
    const select = document.createElement("select");
    select.append(new Option(`default (${prop.default ?? "server's"})`, ""));
    for (const value of prop.enum) select.append(new Option(value, value));
    return select;
  }
  if (prop.type === "boolean") {
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = prop.default === true;
    return box;
  }
  if (prop.type === "integer" || prop.type === "number") {
    const input = document.createElement("input");
    input.type = "number";
    input.step = prop.type === "integer" ? "1" : "any";
    if (prop.minimum !== undefined) input.min = prop.minimum;
    if (prop.maximum !== undefined) input.max = prop.maximum;
    if (prop.default !== undefined) input.placeholder = prop.default;
    return input;
  }
  const input = document.createElement(LONG_TEXT.has(name) ? "textarea" : "input");
  if (prop.maxLength) input.maxLength = prop.maxLength;
  if (prop.default !== undefined) input.placeholder = prop.default;
  return input;
}

function bounds(prop) {
  if (prop.minimum !== undefined && prop.maximum !== undefined) {
    return `(${prop.minimum}–${prop.maximum})`;
  }
  if (prop.maxLength) return `(at most ${prop.maxLength} characters)`;
  return "";
}
