//! A model's chat template (Jinja, with Hugging Face's conventions), rendered with minijinja.

use minijinja::{Environment, Error, ErrorKind, context};
use serde::Serialize;

/// Why a chat template cannot be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template is not valid Jinja.
    #[error("the chat template does not compile: {0}")]
    Compile(Error),
    /// Rendering failed (e.g. the template called `raise_exception`).
    #[error("cannot render the chat template: {0}")]
    Render(Error),
}

/// A compiled chat template.
pub struct ChatTemplate {
    environment: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the texts templates may insert.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self, ChatTemplateError> {
        let mut environment = Environment::new();
        // Hugging Face renders templates with trim_blocks and lstrip_blocks, and with Python's
        // string methods (`.strip()`, `.startswith()`, …).
        environment.set_trim_blocks(true);
        environment.set_lstrip_blocks(true);
        environment.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        environment.add_function("raise_exception", |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        environment
            .add_template_owned("chat", source.to_string())
            .map_err(ChatTemplateError::Compile)?;
        Ok(ChatTemplate {
            environment,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// The prompt for `messages` (anything serialising to `{role, content}` objects), ending
    /// with the opening of the assistant's turn.
    pub fn render<M: Serialize>(&self, messages: &[M]) -> Result<String, ChatTemplateError> {
        let template = self
            .environment
            .get_template("chat")
            .map_err(ChatTemplateError::Render)?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(ChatTemplateError::Render)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Message {
        role: &'static str,
        content: &'static str,
    }

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
        {{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}\
        {{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}\
        {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_a_chatml_template_with_a_default_system_turn() {
        let template = ChatTemplate::new(CHATML, None, Some("<|im_end|>")).unwrap();
        let prompt = template
            .render(&[Message {
                role: "user",
                content: "Hi",
            }])
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let source = "{% for m in messages %}{% if m.role not in ['user'] %}{{ raise_exception('only user turns') }}\
            {% endif %}{{ bos_token }}{{ m.content.strip().upper() }}{% if m.content.startswith(' ') %}!{% endif %}{% endfor %}";
        let template = ChatTemplate::new(source, Some("<s>"), None).unwrap();
        let ok = template
            .render(&[Message {
                role: "user",
                content: "  hello ",
            }])
            .unwrap();
        assert_eq!(ok, "<s>HELLO!");
        let err = template
            .render(&[Message {
                role: "system",
                content: "x",
            }])
            .unwrap_err()
            .to_string();
        assert!(err.contains("only user turns"), "{err}");
        assert!(
            ChatTemplate::new("{% for %}", None, None)
                .unwrap_err()
                .to_string()
                .contains("does not compile")
        );
    }
}
