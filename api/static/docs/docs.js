// The API docs: Swagger UI (vendored, api/static/docs/vendor) on this API's own
// OpenAPI document. "Authorize" takes an API key or a browser credential, and
// "Try it out" calls this API from the page.
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#docs",
    deepLinking: true,
    persistAuthorization: true,
    tryItOutEnabled: false,
    // No call to an outside validator: nothing leaves this origin.
    validatorUrl: null,
  });
});
