from distillab.cli import main

main()
